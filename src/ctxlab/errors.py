"""Exceptions with messages written for people: each names what was wrong and what is allowed."""


class CtxlabError(Exception):
    """Base class of every error ctxlab raises on purpose."""


class ConfigError(CtxlabError, ValueError):
    """An impossible or unsupported model configuration.

    Carries every problem found at once (``problems``), one per line in the message.
    """

    def __init__(self, problems: list[str], where: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where} ({len(self.problems)} problem(s)):\n{lines}")


class CheckpointError(CtxlabError, ValueError):
    """A checkpoint that cannot be loaded as it is (missing, unexpected, mis-shaped tensors, pickles)."""


class CacheOverflowError(CtxlabError, IndexError):
    """More tokens were written to a cache than it was allocated for."""


class InputError(CtxlabError, ValueError):
    """A bad argument to a ctxlab function or command: token ids, prompts, sampling settings, dtype
    names, output paths, a generation longer than the model's trained context."""
