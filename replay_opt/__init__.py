"""replay_opt: train PyTorch models with Features Replay in two lines.

model = ReplayModelWrapper(model, num_modules=4)
optimizer = ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
"""

from .bypass import BypassError
from .diagnostics import SigmaProbe
from .optimizer import ReplayOptimizer
from .wrapper import ReplayModelWrapper

__version__ = "0.1.0"
__all__ = ["BypassError", "ReplayModelWrapper", "ReplayOptimizer", "SigmaProbe", "__version__"]
