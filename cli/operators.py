"""`ordermill operator add/list/remove/passwd`: the console's operator accounts. A password
is read from standard input (one line) when that is not a terminal, and asked twice when it
is; it is stored only as an argon2id hash."""

from __future__ import annotations

import getpass
import sys
from typing import Any

import typer

from console.accounts import AccountError, Role

operators_app = typer.Typer(help="The web console's operator accounts.", no_args_is_help=True)
NameArg = typer.Argument(..., help="The operator's sign-in name.")


def _password() -> str:
    from cli.main import UserError

    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise UserError("no password on standard input (one line)")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _with_db(fn: Any) -> Any:
    from cli.main import UserError, _with_db

    try:
        return _with_db(fn)
    except AccountError as exc:
        raise UserError(str(exc)) from None


@operators_app.command("add")
def add(name: str = NameArg,
        role: Role = typer.Option(..., "--role", help="reviewer (acts) or viewer (reads).")) -> None:
    """Add an operator: the password comes from standard input or a prompt."""
    from cli.main import UserError, _say
    from console import accounts

    try:
        accounts.check_name(name)
        password = accounts.check_password(_password())
    except AccountError as exc:
        raise UserError(str(exc)) from None
    _with_db(lambda conn: accounts.add(conn, name, role, password))
    _say(f"operator {name} added ({role.value})")


@operators_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON only.")) -> None:
    """The operators, with their roles."""
    from cli.main import emit_json, out, table
    from console import accounts

    rows = _with_db(accounts.listing)
    if as_json:
        return emit_json(rows)
    out.print(table("Operators", ["name", "role", "disabled", "created"],
                    [[r["name"], r["role"], "yes" if r["disabled"] else "", r["created_at"][:19]]
                     for r in rows]))


@operators_app.command("remove")
def remove(name: str = NameArg) -> None:
    """Remove an operator (signed out at once; history keeps the name)."""
    from cli.main import _say
    from console import accounts

    _with_db(lambda conn: accounts.remove(conn, name))
    _say(f"operator {name} removed")


@operators_app.command("passwd")
def passwd(name: str = NameArg) -> None:
    """Set an operator's password (its sessions end)."""
    from cli.main import UserError, _say
    from console import accounts

    try:
        password = accounts.check_password(_password())
    except AccountError as exc:
        raise UserError(str(exc)) from None
    _with_db(lambda conn: accounts.set_password(conn, name, password))
    _say(f"password of operator {name} changed")
