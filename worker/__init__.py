"""The Celery worker: the thin `run_job` task, the job executor and one runner per job kind.

Only this package imports torch and diffusers.
"""
