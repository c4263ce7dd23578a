"""Code shared by the web app and the workers: settings, models, specs, storage, job lifecycle.

Never imports `web`, `worker` or torch.
"""
