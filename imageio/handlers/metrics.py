"""/metrics: the Prometheus scrape target (control service and the
``[metrics]`` listener)."""

from .. import metrics


class Metrics:

    def get(self, req, resp):
        body, content_type = metrics.exposition(req.headers.get("accept"))
        resp.send(200, body, content_type)
