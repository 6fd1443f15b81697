"""A short schemathesis pass over the service's OpenAPI schema: no request may cause a 5xx."""

from __future__ import annotations

import pytest
from hospital_model import ThresholdPredictor

from medseg.serve import create_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

APP = create_app(predictor=ThresholdPredictor(), max_upload_mb=1, max_pending=4)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    # 503 is the queue's documented back-pressure answer to a burst of generated uploads.
    response = case.call()
    if response.status_code != 503:
        case.validate_response(response, checks=[not_a_server_error])
