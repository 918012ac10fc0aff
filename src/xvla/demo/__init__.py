"""`xvla demo`: the whole X-VLA story on a laptop-sized budget, from nothing to a report.

Stages (each one's size is a field of `DemoConfig`; `SCALES` holds the presets):

1. **generate**  scripted-expert episodes for the pre-training sources and the held-out robot (`xvla.sim`),
   cached: a rerun with the same settings reuses the datasets.
2. **oracle**    replays a few recorded episodes through the serving action path (no model): the ceiling
   that the data and conventions allow.
3. **pretrain**  a small X-VLA on the pre-training mixture, one soft prompt per source (`xvla.train.train`).
4. **adapt**     the two-stage recipe on the held-out robot (`xvla.train.adapt.adapt`): a new domain
   initialised from the best-fitting existing one, stage 1 trains only its prompt and heads, stage 2 `mode`.
5. **evaluate**  closed-loop success through the serving `Policy` (`xvla.sim.evaluate`): the held-out robot
   untrained, before adaptation (the pre-trained model through the domain adaptation starts from) and after;
   the pre-training sources in distribution.
6. **report**    `results.json` (every number), `report.md` and `plots/*.png`.

Everything the report shows is in `results.json`, so `write_report(results, out)` can redraw it.

Modules: `config` (DemoConfig and the scales), `stages` (the stages and `run_demo`), `report` (report.md, plots,
summary), `cli` (`xvla demo`). Simulator worker pools are `xvla.sim.jobs`; devices and threads `xvla.devices`.
"""

from xvla.demo.cli import main, register
from xvla.demo.config import SCALES, STAGES, DemoConfig, demo_config
from xvla.demo.report import write_report
from xvla.demo.stages import Runtime, run_demo

__all__ = [
    "SCALES",
    "STAGES",
    "DemoConfig",
    "Runtime",
    "demo_config",
    "main",
    "register",
    "run_demo",
    "write_report",
]
