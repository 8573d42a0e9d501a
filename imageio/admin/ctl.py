"""ovirt-imageioctl: manage the daemon's tickets from the command line."""

import argparse
import json
import sys

from . import Client, DEFAULT_CONFDIR, Error, load_config


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        return 2
    args.conf_dir = (getattr(args, "sub_conf_dir", None)
                     or args.main_conf_dir or DEFAULT_CONFDIR)
    try:
        cfg = load_config(args.conf_dir)
        with Client(cfg) as client:
            args.func(client, args)
    except Error as e:
        print("ovirt-imageioctl: {}".format(e), file=sys.stderr)
        return 1
    return 0


def build_parser():
    # -c is accepted before and after the subcommand; the two positions
    # use their own names so one never resets the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--conf-dir", dest="sub_conf_dir", metavar="CONFDIR",
        help="daemon configuration directory (default {})".format(
            DEFAULT_CONFDIR))

    parser = argparse.ArgumentParser(
        prog="ovirt-imageioctl",
        description="Manage ovirt-imageio tickets.")
    parser.add_argument(
        "-c", "--conf-dir", dest="main_conf_dir", metavar="CONFDIR",
        help="daemon configuration directory (default {})".format(
            DEFAULT_CONFDIR))
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("add-ticket", parents=[common],
                       help="add a ticket from a JSON file ('-' for stdin)")
    p.add_argument("filename")
    p.set_defaults(func=add_ticket)

    p = sub.add_parser("show-ticket", parents=[common],
                       help="show a ticket as JSON")
    p.add_argument("ticket_id")
    p.set_defaults(func=show_ticket)

    p = sub.add_parser("list-tickets", parents=[common],
                       help="list ticket ids")
    p.set_defaults(func=list_tickets)

    p = sub.add_parser("mod-ticket", parents=[common],
                       help="change a ticket's timeout")
    p.add_argument("ticket_id")
    p.add_argument("--timeout", type=int, required=True,
                   help="seconds from now until the ticket expires "
                        "(0 expires it now)")
    p.set_defaults(func=mod_ticket)

    p = sub.add_parser("del-ticket", parents=[common],
                       help="delete a ticket")
    p.add_argument("ticket_id")
    p.set_defaults(func=del_ticket)
    return parser


def add_ticket(client, args):
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise Error("Cannot read ticket file {}: {}".format(
            args.filename, e.strerror))
    try:
        ticket = json.loads(text)
    except ValueError as e:
        raise Error("Invalid ticket file {}: {}".format(args.filename, e))
    client.add_ticket(ticket)


def show_ticket(client, args):
    print(json.dumps(client.get_ticket(args.ticket_id), indent=4))


def list_tickets(client, args):
    for ticket_id in client.list_tickets():
        print(ticket_id)


def mod_ticket(client, args):
    if args.timeout < 0:
        raise Error("Invalid --timeout {}: must be >= 0".format(args.timeout))
    client.mod_ticket(args.ticket_id, {"timeout": args.timeout})


def del_ticket(client, args):
    client.del_ticket(args.ticket_id)


if __name__ == "__main__":
    sys.exit(main())
