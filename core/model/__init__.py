"""The network: ModelConfig (config), the Transformer's parts (layers) and the Transformer (transformer),
its scripted one-row CPU step (cpu_step), and its weight formats: float16 (half) and int8 (quant).

`sol.core.model` was one module before this package; its names still resolve here, with a
DeprecationWarning, until Sol 0.2 (core/_moved.py). Import them from the modules above.
"""
from .._moved import forward

__getattr__ = forward(__name__, "sol.core.model.transformer", "sol.core.model.layers", package_path=__path__)
