"""A run and the machinery around it: building datamodule, module and trainer from a config
(``build``), fitting and writing results.json (``fit``), pipelines of stages (``pipeline``), and
the cluster: SLURM allocation checks and submitit's requeue (``slurm``), saving on a signal
(``preemption``), loggers that survive resumption (``loggers``)."""
