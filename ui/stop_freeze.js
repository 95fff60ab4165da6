() => {
  // Stop, as the page shows it. Measured in chromium: when Stop is clicked the page is still
  // behind the server (updates sent but not yet rendered, plotly redraws holding the main
  // thread) and the model writes on until Stop reaches it, so the text kept growing for
  // 0.3-0.8 s after the click. `window.freezeReply()` (the Stop button's js) shows, in place of
  // the reply and the status line, copies of them as they are at the click; the server keeps
  // the reply the page held at the click (ui/handlers.py `stop`), and the copies go away
  // when its final update has landed, which then shows the same text. They also go away if
  // that never comes (a safety timeout), so the page can never stay frozen.
  const ENDED = /finished:|Stopped|⚠/;
  const SAFETY_MS = 120000;
  let frozen = null;
  const statusOf = () =>
    document.querySelector('#status [data-testid="markdown"]:not([data-stop-copy])');
  const hide = (el) => el.setAttribute("data-stop-hidden", "");
  const copyOver = (el) => {
    const copy = el.cloneNode(true);
    copy.setAttribute("data-stop-copy", "");
    el.parentNode.insertBefore(copy, el);
    hide(el);
    return copy;
  };
  const thaw = () => {
    if (!frozen) return;
    frozen.observer.disconnect();
    clearTimeout(frozen.timer);
    document.querySelectorAll("[data-stop-copy]").forEach((e) => e.remove());
    document.querySelectorAll("[data-stop-hidden]").forEach((e) => {
      e.removeAttribute("data-stop-hidden");
    });
    frozen = null;
  };
  const check = () => {
    const md = statusOf();
    // the server's last update has landed (or the chat was cleared under the copy)
    if (frozen && (!md || ENDED.test(md.textContent) || !frozen.reply.isConnected)) thaw();
  };
  window.freezeReply = () => {
    const md = statusOf();
    const messages = document.querySelectorAll(
      '#chatbot [data-testid="bot"], #chatbot [data-testid="user"]'
    );
    const last = messages[messages.length - 1];
    // Only a reply the page shows running; before its first text there is nothing to hold
    // (the server then takes the message back: nothing of the reply was seen).
    if (frozen || !md || ENDED.test(md.textContent) || !last) return;
    const reply = last.getAttribute("data-testid") === "bot" && last.querySelector(".message-content");
    if (!reply) return;
    const line = copyOver(md);
    (line.querySelector(".md") || line).textContent =
      "■ Stopped: the reply ends where it was when you pressed Stop.";
    copyOver(reply);
    frozen = { reply, observer: new MutationObserver(check), timer: setTimeout(thaw, SAFETY_MS) };
    for (const id of ["#chatbot", "#status"]) {
      const opts = { subtree: true, childList: true, characterData: true };
      frozen.observer.observe(document.querySelector(id), opts);
    }
  };
}
