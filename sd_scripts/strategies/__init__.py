"""Model-family strategies: how a family turns captions into conditioning and calls its U-Net.

One module per family (sd.py for SD 1.x / 2.x; SDXL follows). The shared training loop only talks to the
`FamilyStrategy` interface in base.py, so adding a family never touches the loop, the dataset or bucketing.
"""
from .base import FamilyStrategy, strategy_for

__all__ = ["FamilyStrategy", "strategy_for"]
