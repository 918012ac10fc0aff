"""xvla: X-VLA, a soft-prompted cross-embodiment vision-language-action policy."""

__version__ = "0.1.0"
