"""What stage 2 of an adaptation trains (`AdaptConfig.mode`, `DemoConfig.adapt_mode`) and where the new domain
starts (`AdaptConfig.init`, `DemoConfig.adapt_init`); torch-free, so configs and the CLI can name them without
loading the trainer.

"full": everything; "lora": LoRA adapters on every linear layer + prompt + heads; "prompt": prompt + heads;
"last_layer": prompt + heads + the head's last transformer block and final norm; "soft_prompts": the soft prompts
alone, in both stages (the action heads stay as initialised).
"""

from __future__ import annotations

from typing import Literal, get_args

AdaptMode = Literal["full", "lora", "prompt", "last_layer", "soft_prompts"]
ADAPT_MODES: tuple[str, ...] = get_args(AdaptMode)
# `init` rules besides the name of an existing domain to copy: the domain whose prompt and heads fit the new data
# best, or a random prompt and heads
ADAPT_INITS = ("retrieval", "scratch")
