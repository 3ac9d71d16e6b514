"""The fast path of manifold-constrained hyper-connections (mHC; Xie et al. 2025, arXiv 2512.24880):
the same arithmetic as :class:`~ctxlab.nn.residual.HyperConnection`'s reference path, scheduled to
touch the wide residual ``X [N, n, H]`` (N tokens, n streams) as few times as possible.

DeepSeek reports +6.7% training time for mHC at n = 4 with fused kernels. In plain PyTorch the cost
is in dozens of tiny ops per connection and in passes over the n-times wider stream, so:

* **Sinkhorn** (:class:`Sinkhorn`) is one autograd node: the forward runs the 20 row / column
  normalisations without recording them; the backward recomputes them and applies each step's
  vector-Jacobian product by hand, instead of keeping ~80 intermediate tensors alive from forward
  to backward. Where ctxlab's native kernels run (:mod:`ctxlab.native`), both are one pass over
  the tokens (``ctxlab::sinkhorn``, a token's ~40 steps in registers); elsewhere they are ~40 small
  PyTorch ops over all tokens (:func:`sinkhorn_forward_pytorch`, the oracle of the native one).
* **Split** (:class:`HyperSplit`): the RMS norm is applied to the 24 mixing logits instead of the
  n·H inputs (``(x / rms) · fnᵀ = (x · fnᵀ) / rms``), so no normalised copy of X is made or saved;
  the norm's statistics, the one projection of all dynamic mappings and the pre-collapse
  ``u = Σ_i pre_i X_i`` each read X once; the backward accumulates the three gradients of X into
  one buffer.
* **Merge** (:class:`HyperMerge`): ``X' = combᵀ X + post ⊗ y`` as one batched matmul over the
  stream axis plus one in-place rank-1 update; its backward is four batched matmuls.
* Under ``torch.compile`` the collapse and the mix are written as broadcasts over the stream axis
  (``(pre · X).sum``, ``(combᵀ[..., None] · X[:, None]).sum``) so inductor fuses them with their
  neighbours instead of calling out to a batched-matmul kernel.
* **Where the native kernels run** (float32 / bf16 stream, n ≤ 8), a connection's split and its merge
  are one call each (``ctxlab::hc_split``, ``ctxlab::hc_merge``): at inference a decode step would
  otherwise dispatch ~30 ops per connection on a handful of numbers (under ``torch.compile`` the merge
  is left to inductor, which fuses its broadcasts; the split stays one call). In training (float32 stream)
  :class:`NativeHyperSplit` / :class:`NativeHyperMerge` wrap them with their one-pass backward
  kernels (``ctxlab::hc_split_backward``: ∂X, ∂fn and the pre logits' gradient; ``ctxlab::hc_merge_backward``),
  eager and under ``torch.compile`` (opaque calls with registered shapes), where PyTorch runs three
  skinny matrix products with the [M, n·H] projection and a dozen passes over the stream.
  :func:`pytorch_ops` turns the native kernels off for a block of code (the benchmark's comparison).

Numerics: equal to the reference within float rounding (the tests hold outputs and every
parameter's gradient to 1e-5 in float32; at very sharp mixing logits, where float32 itself
resolves a few 1e-5, both paths to the float64 reference within 1e-4). Mixing weights are computed
in float32 whatever the residual's dtype; the collapse is float32 then cast; the mix runs in the
residual's dtype — as the reference and HF ``DeepseekV4HyperConnection`` do.

Gradients are first-order: the backwards recompute from saved numbers (or run native kernels) that
autograd cannot differentiate again, so a second-order gradient through them (``create_graph=True``,
e.g. a gradient penalty) raises (:func:`first_order`); the reference path (``set_hc_impl(model,
"reference")``) differentiates twice.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .. import native


def _normalise_steps(iters: int) -> list[int]:
    """The axis of each Sinkhorn normalisation of ``m [i, j, N]`` after the row softmax (over j):
    columns (sum over i, axis 0) first, then ``iters - 1`` (row, column) pairs; the order of HF
    ``DeepseekV4HyperConnection``."""
    return [0] + [1, 0] * (iters - 1)


_NATIVE = {"on": True}  # off inside pytorch_ops()


@contextlib.contextmanager
def pytorch_ops():
    """Inside this block the fast path uses PyTorch's ops even where the native kernels run (to
    compare the two in one process: ``benchmarks/mhc_overhead.py --pytorch-ops``)."""
    previous, _NATIVE["on"] = _NATIVE["on"], False
    try:
        yield
    finally:
        _NATIVE["on"] = previous


def _native_kernels_take(t: torch.Tensor, streams: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the native mHC kernels run on ``t`` (of one of ``dtypes``) with ``streams`` streams."""
    return (
        _NATIVE["on"]
        and t.dtype in dtypes
        and t.is_cpu
        and streams <= native.SINKHORN_MAX_STREAMS
        and native.available()
    )


def first_order(backward):
    """Refuses ``create_graph=True`` in an autograd Function's ``backward`` that is not differentiable itself:
    autograd would otherwise take its result as a constant and return a wrong second-order gradient (or none).
    ``torch.autograd.function.once_differentiable`` raises only where the incoming gradients require grad,
    which a gradient penalty's do not."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # grad mode in a backward: create_graph
            raise RuntimeError(
                "mHC's fused path has first-order gradients only, and create_graph=True asks for more: "
                "run the model's connections on the reference path, ctxlab.nn.residual.set_hc_impl(model, 'reference')"
            )
        return backward(ctx, *grads)

    return checked


def _runs_natively(logits: torch.Tensor) -> bool:
    """Sinkhorn of logits [n, n, N] in ``ctxlab::sinkhorn``."""
    return _native_kernels_take(logits, logits.shape[0], (torch.float32,))


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def sinkhorn_forward(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """logits [n, n, N] (tokens last) -> the doubly stochastic matrices [n, n, N]: the native kernel
    (one pass over the tokens) or the PyTorch steps."""
    if _runs_natively(logits):
        return torch.ops.ctxlab.sinkhorn(_tokens_last(logits), iters, eps)
    return sinkhorn_forward_pytorch(logits, iters, eps)


def sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Vector-Jacobian product of :func:`sinkhorn_forward`, recomputing its steps: grad, logits
    [n, n, N] -> [n, n, N]."""
    if _runs_natively(logits):
        return torch.ops.ctxlab.sinkhorn_backward(_tokens_last(grad), _tokens_last(logits), iters, eps)
    return sinkhorn_backward_pytorch(grad.contiguous(), logits, iters, eps)


def sinkhorn_forward_pytorch(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """logits [n, n, N] (row i, column j, tokens last so every sum is over whole token vectors)
    -> the reference's ``softmax_row + eps`` then ``m / (sum + eps)`` per step.

    The matrix sits in an [n + 1, n + 1, N] buffer whose extra row and column hold ``eps``, so a sum
    over the buffer's rows (or columns) is already ``sum + eps`` for each column (or row) of the
    matrix: a step is one sum into a preallocated buffer and one in-place division, two kernel
    calls instead of three with their temporaries. At a decode step (N = 1) the 39 steps are all
    dispatch: 1.9x faster than sum / add / divide (172 vs 322 µs per call, 2 threads, measured)."""
    n, N = logits.shape[0], logits.shape[2]
    padded = F.pad(torch.softmax(logits, dim=1).add_(eps), (0, 0, 0, 1, 0, 1), value=eps)  # [n+1, n+1, N]
    m = padded[:n, :n]  # the matrix, normalised in place
    sums = (padded.new_empty(1, n + 1, N), padded.new_empty(n + 1, 1, N))  # over rows (dim 0), columns (dim 1)
    divisors = (sums[0][:, :n], sums[1][:n])  # the matrix's part of each
    for dim in _normalise_steps(iters):
        torch.sum(padded, dim=dim, keepdim=True, out=sums[dim])
        m.div_(divisors[dim])
    return m


def sinkhorn_backward_pytorch(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Vector-Jacobian product of :func:`sinkhorn_forward_pytorch` ([n, n, N]), recomputing its steps (as
    ``sum + eps`` on the matrix itself, keeping each step: the forward's values up to float rounding).

    Step ``m' = m / d`` with ``d = Σ_axis m + eps`` has ``∂L/∂m = (g - Σ_axis(g ⊙ m')) / d``; the
    row softmax has ``∂L/∂z = p ⊙ (g - Σ_row(g ⊙ p))``."""
    p = torch.softmax(logits, dim=1)
    m, steps = p + eps, []
    for dim in _normalise_steps(iters):
        d = m.sum(dim=dim, keepdim=True).add_(eps)
        m = m / d
        steps.append((m, d, dim))
    g = grad
    for m, d, dim in reversed(steps):
        g = (g - (g * m).sum(dim=dim, keepdim=True)).div_(d)
    return p * (g - (g * p).sum(dim=1, keepdim=True))


class Sinkhorn(torch.autograd.Function):
    """:func:`sinkhorn_forward` as one autograd node whose backward recomputes the iterations
    (only the logits are saved)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters, ctx.eps = iters, eps
        return sinkhorn_forward(logits, iters, eps)

    @staticmethod
    @first_order
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(grad, logits, ctx.iters, ctx.eps), None, None


def _gains(scale: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """One gain per mixing logit: ``scale[k]`` repeated over part k's ``sizes[k]`` logits -> [M, 1]."""
    return torch.cat([scale[k : k + 1].expand(size) for k, size in enumerate(sizes)])[:, None]


def _logits(flat: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, sizes, norm_eps: float):
    """The dynamic + static mixing logits, tokens last: ``z = α · (x̃ · fnᵀ) + b`` [M, N], with the
    RMS norm of x applied to the M logits instead of the n·H inputs. Also returns the
    un-normalised projection [M, N], the inverse RMS [N] and the gains [M, 1] (for the backward)."""
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1).square_().div_(flat.shape[-1]).add_(norm_eps))
    raw = fn @ flat.t()  # [M, N]
    gains = _gains(scale, sizes)
    return torch.addcmul(base[:, None], raw * inv_rms, gains), raw, inv_rms, gains


class HyperSplit(torch.autograd.Function):
    """X [N, n, H] -> block input ``u`` [N, H] (X's dtype) and the float32 mixing weights
    ``post`` [N, n] and ``comb`` [N, n, n]; ``mix_weights=False`` gives the pre-only collapse of
    HF ``DeepseekV4HyperHead`` (``fn`` [n, n·H], one gain) and returns ``u`` alone.

    The small tensors are kept tokens-last ([M, N]) so their reductions are over whole vectors;
    ``post`` / ``comb`` are returned as token-major views of them. Saved for backward: X (alive
    anyway as the residual), the inverse RMS [N], the raw projection [M, N], the sigmoids and
    the Sinkhorn logits; nothing of size N·n·H is created for the backward."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, iters: int, eps: float, norm_eps: float, mix_weights: bool):
        N, n, H = x.shape
        sizes = [n, n, n * n] if mix_weights else [n]
        flat = x.reshape(N, n * H).float()  # a view when X is float32
        z, raw, inv_rms, gains = _logits(flat, fn, base, scale, sizes, norm_eps)
        s = torch.sigmoid(z[: 2 * n])  # [2n, N] (pre, post) or [n, N] (head)
        pre = (s[:n] + eps).t().contiguous()  # [N, n]
        u = torch.bmm(pre[:, None, :], flat.view(N, n, H)).view(N, H).to(x.dtype)
        ctx.shape, ctx.sizes, ctx.consts = (N, n, H), sizes, (iters, eps)
        if not mix_weights:
            ctx.save_for_backward(x, fn, inv_rms, raw, gains, s, pre, None)
            return u
        comb_logits = z[2 * n :].view(n, n, N)
        comb = sinkhorn_forward(comb_logits, iters, eps)  # [i, j, N]
        ctx.save_for_backward(x, fn, inv_rms, raw, gains, s, pre, comb_logits)
        return u, (2 * s[n:]).t(), comb.permute(2, 0, 1)

    @staticmethod
    @first_order
    def backward(ctx, g_u, g_post=None, g_comb=None):
        x, fn, inv_rms, raw, gains, s, pre, comb_logits = ctx.saved_tensors
        N, n, H = ctx.shape
        flat = x.reshape(N, n * H).float()
        g_u = g_u.float().contiguous()
        g_pre = torch.bmm(g_u[:, None, :], flat.view(N, n, H).transpose(1, 2)).view(N, n).t()  # [n, N]: X_i · g_u
        g_rest = _mixing_grads(g_post, g_comb, s, comb_logits, *ctx.consts)
        g_z = torch.cat([g_pre * s[:n] * (1 - s[:n]), g_rest])  # [M, N]
        mix = raw * inv_rms
        g_mix = g_z * gains
        g_raw = g_mix * inv_rms  # [M, N]
        g_fn = g_raw @ flat  # [M, n·H]
        g_rms = (g_mix * raw).sum(0).mul_(inv_rms.pow(3)).mul_(-1.0 / (n * H))  # [N]; ∂inv_rms/∂x = -inv_rms³ x / (n·H)
        g_x = (g_raw.t() @ fn).addcmul_(g_rms[:, None], flat).view(N, n, H)
        g_x.addcmul_(pre[:, :, None], g_u[:, None, :])  # + pre ⊗ g_u
        return g_x.to(x.dtype), g_fn, *_logit_param_grads(g_z, mix, ctx.sizes), None, None, None, None


def _mixing_grads(g_post, g_comb, s, comb_logits, iters: int, eps: float) -> torch.Tensor:
    """The gradient of the post and comb logits (rows n.. of z) [n + n², N], from those of post [N, n]
    and comb [N, n, n] through ``2σ`` and Sinkhorn; [0, N] for the head (no post or comb). s is σ(z[:2n])."""
    if g_post is None:
        return s.new_zeros(0, s.shape[1])
    n, N = g_post.shape[1], s.shape[1]
    g_c = sinkhorn_backward(g_comb.permute(1, 2, 0), comb_logits, iters, eps)
    return torch.cat([2 * g_post.t() * s[n:] * (1 - s[n:]), g_c.reshape(n * n, N)])


def _logit_param_grads(g_z: torch.Tensor, mix: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """∂base [M] and ∂scale [parts] of ``z = gains ⊙ mix + base`` from ∂z [M, N]."""
    return g_z.sum(1), torch.stack([part.sum() for part in (g_z * mix).split(sizes)])


class NativeHyperSplit(torch.autograd.Function):
    """:class:`HyperSplit` on ctxlab's native kernels (float32 stream): the forward is ``ctxlab::hc_split``,
    which also returns the normalised projection ``mix`` [M, N] and the inverse RMS [N] for the
    backward; the backward is ``ctxlab::hc_split_backward`` (∂X, ∂fn and the pre logits' gradient in
    one pass over the stream) around the small [M, N] steps of :func:`_mixing_grads`. Under
    ``torch.compile`` both are opaque calls, as Sinkhorn is.

    A connection's split also hands x back (a view of it, the ``stream`` :func:`merge` mixes): x's
    gradient from the merge then arrives in this backward as ``g_stream``, and the kernel adds it in
    its own pass, where autograd would sum the two gradients of x in a pass over three streams."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, iters: int, eps: float, norm_eps: float, mix_weights: bool):
        u, post, comb, mix, inv_rms = torch.ops.ctxlab.hc_split(x, fn, base, scale, iters, eps, norm_eps)
        ctx.save_for_backward(x, fn, base, scale, mix, inv_rms)
        ctx.consts, ctx.mix_weights = (iters, eps), mix_weights
        return (u, post, comb, x.view_as(x)) if mix_weights else u

    @staticmethod
    @first_order
    def backward(ctx, g_u, g_post=None, g_comb=None, g_stream=None):
        x, fn, base, scale, mix, inv_rms = ctx.saved_tensors
        N, n, _ = x.shape
        sizes = [n, n, n * n] if ctx.mix_weights else [n]
        gains = _gains(scale, sizes)  # [M, 1]
        z = torch.addcmul(base[:, None], mix, gains)  # [M, N], as the forward computed it
        s = torch.sigmoid(z[: 2 * n])
        comb_logits = z[2 * n :].view(n, n, N) if ctx.mix_weights else None
        g_rest = _mixing_grads(g_post, g_comb, s, comb_logits, *ctx.consts).contiguous()
        g_stream = None if g_stream is None else g_stream.contiguous()
        g_x, g_fn, g_z_pre = torch.ops.ctxlab.hc_split_backward(
            x,
            fn,
            gains.view(-1),
            mix,
            inv_rms,
            s[:n].contiguous(),
            g_u.float().contiguous(),
            g_rest,
            g_stream,
            ctx.consts[1],
        )
        g_z = torch.cat([g_z_pre, g_rest])
        return g_x, g_fn, *_logit_param_grads(g_z, mix, sizes), None, None, None, None


class HyperMerge(torch.autograd.Function):
    """``X' = combᵀ X + post ⊗ y`` (all in X's dtype): x [N, n, H], y [N, H], post [N, n],
    comb [N, n, n]. Saves only its inputs; the backward is four batched matmuls."""

    @staticmethod
    def forward(ctx, x, y, post, comb):
        ctx.save_for_backward(x, y, post, comb)
        return torch.bmm(comb.transpose(1, 2).contiguous(), x).addcmul_(post[..., None], y[:, None])

    @staticmethod
    def backward(ctx, g):
        x, y, post, comb = ctx.saved_tensors
        g = g.contiguous()  # bmm on a broadcast gradient falls back to one matmul per token
        N, n, H = x.shape
        g_x = torch.bmm(comb.contiguous(), g)  # [N, n, H]: Σ_j comb[i, j] g_j
        g_y = torch.bmm(post.contiguous()[:, None, :], g).view(N, H)
        g_post = torch.bmm(y[:, None, :], g.transpose(1, 2)).view(N, n)  # y · g_j
        g_comb = torch.bmm(x, g.transpose(1, 2))  # [N, n, n]: [i, j] = X_i · g_j
        return g_x, g_y, g_post, g_comb


class NativeHyperMerge(torch.autograd.Function):
    """:class:`HyperMerge` on ctxlab's native kernels (float32): ``ctxlab::hc_merge`` forward,
    ``ctxlab::hc_merge_backward`` (all four gradients in one pass over the stream) backward."""

    @staticmethod
    def forward(ctx, x, y, post, comb):
        ctx.save_for_backward(x, y, post, comb)
        return torch.ops.ctxlab.hc_merge(x, y, post, comb)

    @staticmethod
    @first_order
    def backward(ctx, g):
        return torch.ops.ctxlab.hc_merge_backward(*ctx.saved_tensors, g.contiguous())


def _mix_traceable(x, y, post, comb):
    """The merge as broadcasts over the stream axis, for inductor to fuse (``torch.compile``)."""
    return (comb[..., None] * x[:, :, None]).sum(dim=1) + post[..., None] * y[:, None]


def _split_traceable(x, fn, base, scale, iters, eps, norm_eps, mix_weights):
    """The split as differentiable tensor code for ``torch.compile`` (inductor derives and fuses
    the backward); Sinkhorn keeps its recomputing autograd node."""
    N, n, H = x.shape
    flat = x.reshape(N, n * H).float()
    inv_rms = torch.rsqrt(flat.square().mean(-1) + norm_eps)  # [N]
    sizes = [n, n, n * n] if mix_weights else [n]
    z = (fn @ flat.t()) * inv_rms * _gains(scale, sizes) + base[:, None]  # [M, N]
    s = torch.sigmoid(z[: 2 * n])
    u = ((s[:n] + eps).t()[..., None] * flat.view(N, n, H)).sum(dim=1).to(x.dtype)
    if not mix_weights:
        return u
    comb = Sinkhorn.apply(z[2 * n :].view(n, n, N), iters, eps)
    return u, (2 * s[n:]).t(), comb.permute(2, 0, 1)


def _connects_natively(x: torch.Tensor) -> bool:
    """At inference, the whole split and the whole merge of x [..., n, H] are one native call each
    (``ctxlab::hc_split``, ``ctxlab::hc_merge``; a compiled merge is inductor's, see :func:`merge`)."""
    return not torch.is_grad_enabled() and _native_kernels_take(x, x.shape[-2], (torch.float32, torch.bfloat16))


def _trains_natively(x: torch.Tensor) -> bool:
    """With autograd, the split and the merge of a float32 x [..., n, H] run as :class:`NativeHyperSplit`
    and :class:`NativeHyperMerge`."""
    return torch.is_grad_enabled() and _native_kernels_take(x, x.shape[-2], (torch.float32,))


def _float32(p: torch.Tensor) -> torch.Tensor:
    return p if p.dtype == torch.float32 else p.float()  # no dispatched no-op cast per parameter at a decode step


def _mixing_params(module: torch.nn.Module, names: tuple[str, str, str]) -> tuple[torch.Tensor, ...]:
    """The module's projection, bias and gains as float32, read from its parameter dict: ``Module.__getattr__``
    takes ~0.5 µs a parameter, 10x the dict's lookup, and a decode step reads three per connection."""
    params, (fn, base, scale) = module._parameters, names
    return _float32(params[fn]), _float32(params[base]), _float32(params[scale])


def _split(x, fn, base, scale, iters, eps, norm_eps, mix_weights):
    if _trains_natively(x):
        return NativeHyperSplit.apply(x.contiguous(), fn, base, scale, iters, eps, norm_eps, mix_weights)
    if torch.compiler.is_compiling():
        return _split_traceable(x, fn, base, scale, iters, eps, norm_eps, mix_weights)
    return HyperSplit.apply(x, fn, base, scale, iters, eps, norm_eps, mix_weights)


def split(hc, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Fast ``HyperConnection.split``: x [B, T, n, H] -> u [B, T, H], mixing (post [B, T, n], comb
    [B, T, n, n]); on the native training path mixing also carries the stream the merge mixes, x as
    handed back by :class:`NativeHyperSplit` (so x's gradient from the merge reaches the split's kernel)."""
    params = _mixing_params(hc, ("fn", "base", "scale"))
    if _connects_natively(x):  # one call on x as it is: a decode step dispatches nothing else
        u, post, comb, _, _ = torch.ops.ctxlab.hc_split.default(x.contiguous(), *params, hc.iters, hc.eps, hc.norm_eps)
        return u, (post, comb)
    B, T, n, H = x.shape
    u, post, comb, *stream = _split(x.reshape(B * T, n, H), *params, hc.iters, hc.eps, hc.norm_eps, True)
    return u.view(B, T, H), (post.reshape(B, T, n), comb.reshape(B, T, n, n), *(s.view(x.shape) for s in stream))


def merge(x: torch.Tensor, branch: torch.Tensor, mixing: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Fast ``HyperConnection.merge``: x [B, T, n, H], branch [B, T, H] -> X' [B, T, n, H]. x is the
    split's input; where :func:`split` handed it back in ``mixing``, that view of it is what is mixed."""
    post, comb, *stream = mixing
    if stream:
        handed_back = stream[0]  # x itself, or the split's contiguous copy of a strided x
        other_tensor = (
            x.is_contiguous() and not torch.compiler.is_compiling() and handed_back.data_ptr() != x.data_ptr()
        )
        if handed_back.shape != x.shape or other_tensor:
            raise ValueError(
                f"merge: x [{', '.join(map(str, x.shape))}] is not the tensor the split was given "
                f"([{', '.join(map(str, handed_back.shape))}]): pass the split's input, which these mixing weights are of"
            )
        x = handed_back
    # one call on the tensors as they are; a compiled decode step's merge is left to inductor, which fuses it (the
    # native call stays an opaque extern call): 0.03-0.04 ms a token faster at widths 256 and 512 (docs/benchmarks.md)
    if _connects_natively(x) and branch.dtype == x.dtype and not torch.compiler.is_compiling():
        post, comb = _float32(post).contiguous(), _float32(comb).contiguous()
        return torch.ops.ctxlab.hc_merge.default(x.contiguous(), branch.contiguous(), post, comb)
    B, T, n, H = x.shape
    x3, y = x.reshape(B * T, n, H), branch.reshape(B * T, H)
    if _trains_natively(x) and branch.dtype == x.dtype:
        post, comb = (m.float().reshape(B * T, *m.shape[2:]).contiguous() for m in (post, comb))
        return NativeHyperMerge.apply(x3.contiguous(), y.contiguous(), post, comb).view(B, T, n, H)
    dtype = torch.promote_types(x.dtype, branch.dtype)  # as the reference's broadcasts promote a wider branch
    x3, y = x3.to(dtype), y.to(dtype)
    post, comb = (m.to(dtype).reshape(B * T, *m.shape[2:]) for m in (post, comb))
    mix = _mix_traceable if torch.compiler.is_compiling() else HyperMerge.apply
    return mix(x3, y, post, comb).view(B, T, n, H)


def collapse(head, x: torch.Tensor) -> torch.Tensor:
    """Fast ``HyperHead.forward``: x [B, T, n, H] -> [B, T, H]."""
    params = _mixing_params(head, ("hc_fn", "hc_base", "hc_scale"))
    if _connects_natively(x):
        return torch.ops.ctxlab.hc_split.default(x.contiguous(), *params, 0, head.eps, head.norm_eps)[0]
    B, T, n, H = x.shape
    return _split(x.reshape(B * T, n, H), *params, 0, head.eps, head.norm_eps, False).view(B, T, H)
