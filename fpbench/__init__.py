"""fpbench: compare number formats for LLM quantization, honestly measured.

Pipeline (one direction): formats -> quant -> model_quant -> tasks -> results -> report;
``fpbench.cli`` is a thin layer over ``fpbench.runner``.
"""

__version__ = "0.1.0"
