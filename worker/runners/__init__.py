"""One runner per job kind: a plain function `run(spec, ctx) -> result dict`."""
from worker.runners import ddpm_sample, ddpm_schedule_plot, ddpm_train, noop, sd_img2img, sd_sweep, sd_txt2img

RUNNERS = {
    "ddpm.train": ddpm_train.run,
    "ddpm.sample": ddpm_sample.run,
    "ddpm.schedule_plot": ddpm_schedule_plot.run,
    "sd.txt2img": sd_txt2img.run,
    "sd.img2img": sd_img2img.run,
    "sd.sweep": sd_sweep.run,
    "noop": noop.run,
}
