// The desk works without this file.  With it: the Sign out link posts its form, and an
// open account list asks for its rows every few seconds, so new mail shows up unasked.
"use strict";
document.addEventListener("click", (e) => {
  const link = e.target.closest("a[data-post]");
  if (link) { e.preventDefault(); document.getElementById(link.dataset.post).submit(); }
});
const rows = document.querySelector("[data-poll]");
if (rows) {
  setInterval(async () => {
    if (document.hidden) return;
    const headers = { "X-Desk-Poll": "1", "If-None-Match": rows.dataset.version };
    const r = await fetch(rows.dataset.poll, { headers }).catch(() => null);
    if (r && r.status === 401) location.reload();  // signed out: to the sign-in page
    if (!r || r.status !== 200) return;  // 304: nothing new
    rows.innerHTML = await r.text();
    rows.dataset.version = r.headers.get("ETag") || "";
  }, 1000 * Number(rows.dataset.every));
}
