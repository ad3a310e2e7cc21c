"""The desk in a real browser: Debian's Chromium, headless, driven by Playwright, against a
real ``mailrouter run``.

Sign in, the unread row in bold, open, transfer, bold again in the new account, pick, a
refusal in words, Advanced with the notice preview, sign out; new mail appearing in an
open list; reply and close; what an agent may not see.  Every screen is saved as a PNG
under the run's tmp dir (and copied to /tmp/desk-shots for review).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from desk_support import (
    PASSWORD,
    add_agent,
    interaction_id,
    keep_shot,
    send_mail,
    show,
)
from served import Served, http_settings, start, wait_until

from conftest import need
from helpers import pickup_messages, plain_body

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # a laptop without the dev extras: the fixture says so
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
Shot = Callable[[Page, str], Path]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium (never a downloaded one), headless."""
    need(sync_playwright is not None, "playwright is not installed (pip install -e '.[dev]')")
    need(CHROMIUM.exists(), f"{CHROMIUM} is missing (scripts/test-servers installs chromium)")
    assert sync_playwright is not None
    with sync_playwright() as p:
        # As root Chromium refuses to start with its sandbox on.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for this module's tests; each test uses its own agents and mail."""
    served = start(http_settings(tmp_path_factory.mktemp("desk")))
    try:
        yield served
    finally:
        served.close()


@pytest.fixture(scope="module")
def shot(tmp_path_factory: pytest.TempPathFactory) -> Shot:
    """Save a full-page screenshot under the run's tmp dir, and a copy for review."""
    folder = tmp_path_factory.mktemp("desk-shots")

    def take(page: Page, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        keep_shot(path)
        return path

    return take


def sign_in(browser: Browser, desk: Served, name: str) -> tuple[BrowserContext, Page]:
    context = browser.new_context(base_url=desk.base_url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto("/")
    page.get_by_label("Agent").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{desk.base_url}/accounts")
    return context, page


def weights(page: Page, row_text: str) -> list[int]:
    """The computed font-weight of every cell (and link) of the row showing ``row_text``."""
    row = page.locator("tbody tr", has_text=row_text)
    expect(row).to_have_count(1)
    found: list[int] = row.evaluate(
        "tr => [...tr.querySelectorAll('td, td a')]"
        ".map(e => Number(getComputedStyle(e).fontWeight))"
    )
    return found


def test_walkthrough_sign_in_transfer_pick_refusal_advanced_sign_out(
    browser: Browser, desk: Served, shot: Shot
) -> None:
    """The seed's story in a browser: an unread row in bold, transferred, bold in the new
    account, picked there; a stale Pick refused in words with nothing changed; Advanced
    with a preview; signing out ends the session."""
    settings = desk.settings
    add_agent(settings, "alice", "sales", "support")
    add_agent(settings, "bob", "support")
    subject = "Order 7 – delivery"
    send_mail(settings, to="sales@example.test", subject=subject, msgid="<walk-1@customer.test>")
    iid = interaction_id(settings, subject)

    context = browser.new_context(base_url=desk.base_url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto("/")
    shot(page, "01-sign-in")
    page.get_by_label("Agent").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{desk.base_url}/accounts")
    [cookie] = [c for c in context.cookies() if c["name"] == "mailrouter_session"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", False)
    expect(page.locator("tbody tr", has_text="Example Sales")).to_contain_text("1")
    shot(page, "02-accounts")

    # The sales list: the new interaction unread, every cell of its row bold.
    page.get_by_role("link", name="Example Sales").click()
    expect(page).to_have_url(f"{desk.base_url}/accounts/sales")
    assert min(weights(page, subject)) >= 600
    row = page.locator("tbody tr", has_text=subject)
    expect(row).to_contain_text("Zoë Customer")
    expect(row).to_contain_text("zoe@customer.test")
    shot(page, "03-sales-list-unread")

    # Open it: every message with its original From/To; opening marks it read.
    row.get_by_role("link", name=subject).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(subject)
    message = page.locator("article.message").first
    expect(message).to_contain_text("Zoë Customer <zoe@customer.test>")
    expect(message).to_contain_text("sales@example.test")
    expect(message).to_contain_text("where is my order?")
    assert show(settings, iid)["unread"] is False
    shot(page, "04-interaction")

    # Transfer to support: back on the sales list, which says what happened.
    page.get_by_label("Transfer to").select_option("support")
    page.get_by_role("button", name="Transfer").click()
    expect(page).to_have_url(re.compile(r"/accounts/sales\?"))
    expect(page.get_by_role("status")).to_have_text(
        f"Interaction {iid} transferred to support; the customer is sent a notice."
    )
    expect(page.locator("tbody tr", has_text=subject)).to_have_count(0)
    shot(page, "05-transferred")

    # In support it is unread (bold) again, marked as come by transfer from sales.
    page.goto("/accounts/support")
    assert min(weights(page, subject)) >= 600
    expect(page.locator("tbody tr", has_text=subject)).to_contain_text("by transfer from sales")
    shot(page, "06-support-list-unread")

    # The customer writes again to the old address: the mail joins the interaction and is
    # delivered to support (seed rule 7), keeping its original To (rule 9).
    send_mail(
        settings,
        to="sales@example.test",
        subject=f"Re: {subject}",
        msgid="<walk-2@customer.test>",
        in_reply_to="<walk-1@customer.test>",
        body="Any news?\n",
    )

    # Bob (support) opens it and leaves the page open; then alice picks it.
    bob_context, bob = sign_in(browser, desk, "bob")
    bob.goto(f"/interactions/{iid}")
    expect(bob.get_by_role("button", name="Pick")).to_be_visible()
    page.goto("/accounts/support")
    page.locator("tbody tr", has_text=subject).get_by_role("link", name=subject).click()
    page.get_by_role("button", name="Pick").click()
    expect(page.get_by_role("status")).to_have_text("Picked: it is assigned to you.")
    expect(page.locator(".controls")).to_contain_text("Assigned to you.")
    expect(page.locator("table.list tbody tr")).to_contain_text("sales")  # the transfer history
    routed = page.locator("article.message", has_text="Any news?")
    expect(routed.locator("dl.headers dd").nth(1)).to_have_text("sales@example.test")  # its To
    expect(routed).to_contain_text(
        "routed to support (support@example.test) with X-Mailrouter-Routed-From: sales@example.test"
    )
    shot(page, "07-picked")

    # Bob's page is stale: his Pick is refused in the domain's words, and nothing changes.
    bob.get_by_role("button", name="Pick").click()
    expect(bob.get_by_role("alert")).to_have_text(f"interaction {iid} is already picked by alice")
    assert show(settings, iid)["assigned_agent"] == "alice"
    shot(bob, "08-pick-refused")
    bob_context.close()

    # Advanced: sales' settings, read-only with their TOML keys, and the notice preview.
    page.goto("/accounts/sales")
    page.get_by_role("link", name="Advanced").click()
    expect(page.locator("main")).to_contain_text("accounts.sales.transfer.enabled")
    expect(page.locator("main")).to_contain_text("systemctl reload mailrouter")
    page.get_by_label("Preview for a transfer to").select_option("billing")
    page.get_by_role("button", name="Preview").click()
    preview = page.locator(".preview")
    expect(preview).to_contain_text("from sales@example.test to our colleagues at")
    expect(preview).to_contain_text("billing@example.test")
    expect(preview).to_contain_text("Re: Order 7 – delivery")  # the sample customer's subject
    shot(page, "09-advanced-preview")

    # Sign out: back at the sign-in page, and the old cookie opens nothing any more.
    page.get_by_role("link", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You have signed out.")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert not [c for c in context.cookies() if c["name"] == "mailrouter_session"]
    shot(page, "10-signed-out")
    with httpx.Client(base_url=desk.base_url, cookies={cookie["name"]: cookie["value"]}) as old:
        r = old.get("/accounts", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/?next=%2Faccounts")
    context.close()


def test_new_mail_appears_in_an_open_list_without_a_reload(
    browser: Browser, desk: Served, shot: Shot
) -> None:
    """An account list left open shows a new interaction, bold, within seconds, and the
    page is not reloaded for it."""
    settings = desk.settings
    add_agent(settings, "carol", "billing")
    context, page = sign_in(browser, desk, "carol")
    page.goto("/accounts/billing")
    page.evaluate("window.stillThisPage = true")
    subject = "Invoice 311 is wrong"
    send_mail(settings, to="billing@example.test", subject=subject, msgid="<poll-1@customer.test>")
    expect(page.locator("tbody tr", has_text=subject)).to_have_count(1, timeout=20_000)
    assert page.evaluate("window.stillThisPage") is True
    assert min(weights(page, subject)) >= 600
    shot(page, "11-new-mail-polled")
    context.close()


def test_reply_and_close_from_the_interaction_page(
    browser: Browser, desk: Served, shot: Shot
) -> None:
    """Reply (with "and close it") queues the answer from the account and closes the
    interaction; an account without transfers shows no Transfer button."""
    settings = desk.settings
    add_agent(settings, "dora", "billing")
    subject = "Refund for order 12"
    send_mail(settings, to="billing@example.test", subject=subject, msgid="<reply-1@customer.test>")
    iid = interaction_id(settings, subject)
    context, page = sign_in(browser, desk, "dora")
    page.goto(f"/interactions/{iid}")
    expect(page.get_by_role("button", name="Transfer")).to_have_count(0)
    expect(page.locator(".controls")).to_contain_text("Transfer out of billing is off")
    page.get_by_label("Reply").fill("Your refund is on its way.")
    page.get_by_label("and close it").check()
    shot(page, "12-reply-typed")
    page.get_by_role("button", name="Send reply").click()
    expect(page.get_by_role("status")).to_have_text(
        "Reply queued to the customer, and the interaction closed."
    )
    expect(page.get_by_role("button", name="Close")).to_have_count(0)
    shot(page, "13-replied-and-closed")
    detail = show(settings, iid)
    assert (detail["status"], detail["assigned_agent"]) == ("closed", "dora")
    assert wait_until(lambda: len(pickup_messages(settings)) > 0)
    sent = [m for m in pickup_messages(settings) if b"billing@example.test" in m]
    assert any("Your refund is on its way." in plain_body(m) for m in sent)
    context.close()


def test_agent_gets_404_for_another_accounts_interaction(
    browser: Browser, desk: Served, shot: Shot
) -> None:
    """An interaction owned by an account the agent is not in is "not found", in words,
    and stays unread; the agent's account list names only its own accounts."""
    settings = desk.settings
    add_agent(settings, "erin", "support")
    subject = "Chairs for the new office"
    send_mail(settings, to="sales@example.test", subject=subject, msgid="<hidden-1@customer.test>")
    iid = interaction_id(settings, subject)
    context, page = sign_in(browser, desk, "erin")
    expect(page.locator("tbody tr")).to_have_count(1)
    response = page.goto(f"/interactions/{iid}")
    assert response is not None and response.status == 404
    expect(page.get_by_role("alert")).to_have_text(f"no interaction {iid}")
    assert show(settings, iid)["unread"] is True
    shot(page, "14-not-found")
    context.close()


def test_desk_works_without_javascript(browser: Browser, desk: Served, shot: Shot) -> None:
    """With scripting off: sign in, the list (reloading itself by meta refresh), Pick, and
    Sign out through its confirmation page."""
    settings = desk.settings
    add_agent(settings, "finn", "support")
    subject = "No script here"
    send_mail(settings, to="support@example.test", subject=subject, msgid="<nojs-1@customer.test>")
    iid = interaction_id(settings, subject)
    context = browser.new_context(base_url=desk.base_url, java_script_enabled=False)
    page = context.new_page()
    page.goto("/")
    page.get_by_label("Agent").fill("finn")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.goto("/accounts/support")
    expect(page.locator('meta[http-equiv="refresh"]')).to_have_count(1)
    assert min(weights(page, subject)) >= 600
    page.locator("tbody tr", has_text=subject).get_by_role("link", name=subject).click()
    page.get_by_role("button", name="Pick").click()
    expect(page.get_by_role("status")).to_have_text("Picked: it is assigned to you.")
    assert show(settings, iid)["assigned_agent"] == "finn"
    page.get_by_role("link", name="Sign out").click()
    expect(page).to_have_url(f"{desk.base_url}/sign-out")
    shot(page, "15-sign-out-without-javascript")
    page.locator("main").get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You have signed out.")
    context.close()
