"""One runner per job kind: a plain function `run(spec, ctx) -> result dict`."""
from worker.runners import ddpm_sample, ddpm_schedule_plot, ddpm_train

RUNNERS = {
    "ddpm.train": ddpm_train.run,
    "ddpm.sample": ddpm_sample.run,
    "ddpm.schedule_plot": ddpm_schedule_plot.run,
}
