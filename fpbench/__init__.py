"""fpbench: compare number formats for LLM quantization, honestly measured.

Pipeline (one direction): data -> quant (formats, schemes, RTN/GPTQ, model surgery) ->
kernels -> eval (tasks) -> runner/sweep -> records (store, report); ``fpbench.cli`` is a
thin layer over ``fpbench.runner`` and ``fpbench.sweep``, its flags generated from
``fpbench.options``.
"""

__version__ = "0.2.0"
