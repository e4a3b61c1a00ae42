"""fromscratch: landmark neural architectures written from first principles.

Sub-packages, one per model: `fromscratch.transformer` (Vaswani et al. 2017) and
`fromscratch.llama` (Touvron et al. 2023). Shared infrastructure (the training engine,
checkpoints, schedules, logging and plots) lives in `fromscratch.engine` and knows nothing
about any particular model.
"""

__version__ = "0.1.0"
