"""The REST service (FastAPI) with its job pool and the NiiVue browser viewer."""

from medseg.serve.app import create_app, safe_upload_name
from medseg.serve.jobs import Job, JobPool

__all__ = ["Job", "JobPool", "create_app", "safe_upload_name"]
