"""One runner per job kind: a plain function `run(spec, ctx) -> result dict`."""
from worker.runners import ddpm_sample, ddpm_train

RUNNERS = {
    "ddpm.train": ddpm_train.run,
    "ddpm.sample": ddpm_sample.run,
}
