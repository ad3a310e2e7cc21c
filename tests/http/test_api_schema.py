"""schemathesis over the OpenAPI document a live ``mailrouter run`` serves.

Every operation gets a small, bounded number of generated requests (valid and invalid),
sent over HTTP with an admin's token; every check must pass: no 5xx, statuses and
content types the document declares, bodies that match their schemas.  The daemon has a
few interactions, so generated ids sometimes hit one and the operations really run.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from served import Served, http_settings, start

from helpers import run_cli

MAX_EXAMPLES = 12

# A request can match the schema and still be refused with 422 on its meaning: a period
# that ends before it starts, a cursor this server never handed out, an account that is
# not configured, a blank reply.  Accepting well-formed input means "not 400".
ACCEPTED = ["2xx", "401", "403", "404", "409", "422"]
# And refusing a body over the size limit unread (413) is rejecting it.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def config(token: str) -> schemathesis.Config:
    """Checks as configured for this API, with an admin's token for the `token` scheme
    (given to schemathesis, so that it knows when it leaves the token out on purpose)."""
    return schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"token": {"bearer": token}}},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ACCEPTED},
                "negative_data_rejection": {"expected-statuses": REJECTED},
            },
        }
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    """The daemon with a few interactions in every account, and an admin's token."""
    s = http_settings(tmp_path_factory.mktemp("schema"))
    served = start(s)
    try:
        code, out, err = run_cli(s, "agent", "add", "root", "--admin")
        assert code == 0, err
        with smtplib.SMTP("127.0.0.1", s.smtp.port, timeout=30) as smtp:
            for n, account in enumerate(["sales", "support", "billing"] * 2, start=1):
                smtp.sendmail(
                    f"c{n}@customer.test",
                    [f"{account}@example.test"],
                    f"From: c{n}@customer.test\r\nTo: {account}@example.test\r\n"
                    f"Message-ID: <schema-{n}@customer.test>\r\n"
                    f"Subject: s{n}\r\n\r\nhi\r\n".encode(),
                )
        yield served, out.strip()
    finally:
        assert served.stop() == 0, served.log()


def _conformance_failures(operation: APIOperation, mode: GenerationMode) -> list[str]:
    """Run the generated cases of one operation; the failures schemathesis reports."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,  # nothing written under the work tree
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate()

    try:
        run()
    except Unsatisfiable:
        pass  # no invalid input exists (GET /healthz takes no parameters)
    except Exception as exc:  # noqa: BLE001 - collected, reported together below
        failures.append(f"{operation.label} [{mode.value}]: {exc}")
    return failures


def test_api_conforms_to_its_served_openapi_document(live: tuple[Served, str]) -> None:
    """Every operation, valid and invalid input: no 5xx, only declared statuses and content
    types, bodies matching their schemas (all of schemathesis's checks)."""
    served, token = live
    api = schemathesis.openapi.from_url(
        f"{served.base_url}/api/v1/openapi.json", config=config(token)
    )
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /healthz",
        "GET /api/v1/accounts",
        "GET /api/v1/interactions",
        "GET /api/v1/interactions/{interaction_id}",
        "POST /api/v1/interactions/{interaction_id}/read",
        "POST /api/v1/interactions/{interaction_id}/unread",
        "POST /api/v1/interactions/{interaction_id}/pick",
        "POST /api/v1/interactions/{interaction_id}/transfer",
        "POST /api/v1/interactions/{interaction_id}/reply",
        "POST /api/v1/interactions/{interaction_id}/close",
        "GET /api/v1/reports",
        "GET /api/v1/queue",
        "GET /api/v1/queue/{queue_id}",
        "POST /api/v1/queue/{queue_id}/retry",
        "POST /api/v1/queue/retry-all",
        "POST /api/v1/queue/{queue_id}/hold",
        "POST /api/v1/queue/{queue_id}/release",
        "DELETE /api/v1/queue/{queue_id}",
    }
    failures = [
        failure
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for failure in _conformance_failures(op, mode)
    ]
    assert not failures, "\n\n".join(failures)
