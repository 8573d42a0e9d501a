"""imageio.errors: what each error does to the connection is a class
attribute (read by http's one mapping and by the client's retries)."""

import pytest

from imageio import errors, httpclient


@pytest.mark.parametrize("cls", [
    errors.Forbidden, errors.Canceled, errors.PartialContent,
    errors.LengthRequired])
def test_closes_connection(cls):
    assert cls.close


@pytest.mark.parametrize("cls", [
    errors.BadRequest, errors.NotFound, errors.Conflict,
    errors.RangeNotSatisfiable, errors.BadGateway, errors.InternalError])
def test_keeps_connection(cls):
    assert not cls.close


def test_retriable_only_when_the_remote_failed():
    assert errors.RemoteFailed.retriable
    assert errors.RemoteFailed.status == 502
    assert issubclass(errors.RemoteFailed, errors.BadGateway)
    assert not errors.BadGateway.retriable
    assert not errors.Error.retriable


def test_status_error_retriable_for_server_errors():
    assert httpclient.status_error(503, "busy").retriable
    assert not httpclient.status_error(401, "who").retriable
    assert not httpclient.status_error(404, "gone").retriable
    # Messages unchanged.
    assert str(httpclient.status_error(503, "busy")) == \
        "Remote imageio daemon: busy (HTTP 503)"
