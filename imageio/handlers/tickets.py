"""/tickets/: the control service's ticket API."""

from .. import errors


class Tickets:

    def __init__(self, store, cfg):
        self.store = store
        self.cfg = cfg

    def get(self, req, resp, ticket_id):
        if not ticket_id:
            # Not in the established service: admins want to list tickets.
            resp.send_json(self.store.ids())
            return
        resp.send_json(self.store.get(ticket_id).info())

    def put(self, req, resp, ticket_id):
        if not ticket_id:
            raise errors.MethodNotAllowed("PUT needs a ticket id: /tickets/ID")
        d = req.read_json()
        if isinstance(d, dict) and d.get("uuid", ticket_id) != ticket_id:
            raise errors.BadRequest(
                "Invalid ticket: field 'uuid' does not match the ticket id "
                "in the URL")
        self.store.add(d)
        resp.send(200)

    def patch(self, req, resp, ticket_id):
        if not ticket_id:
            raise errors.MethodNotAllowed(
                "PATCH needs a ticket id: /tickets/ID")
        changes = req.read_json()
        self.store.modify(ticket_id, changes)
        resp.send(200)

    def delete(self, req, resp, ticket_id):
        timeout = self.cfg.control.remove_timeout
        if ticket_id:
            self.store.remove(ticket_id, timeout)
        else:
            self.store.remove_all(timeout)
        resp.send(204)
