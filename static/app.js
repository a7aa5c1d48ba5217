// The browser side of the cookie flow, written as a real app needs it. The access token is kept
// in a variable, never in localStorage (OWASP HTML5 Security Cheat Sheet); the refresh token is
// in an HttpOnly cookie and never reaches this script. Read top to bottom: the state, talking
// to the service, refreshing (one tab at a time), what the buttons do, showing it, the start.
"use strict";

const REFRESH_BEFORE_EXPIRY = 0.2; // refresh when a fifth of the access token's life is left
const MAX_RETRY_DELAY = 30; // seconds: the longest wait between two tries when the service is down
const LOG_LENGTH = 40; // the log keeps this many lines
const tabs = new BroadcastChannel("jwt-refresh-service"); // reaches this site's other tabs
const LOCK = "refresh-cookie"; // held by the one tab that is using the refresh cookie

let accessToken = null;
let claims = null; // the access token's claims, decoded: who, which session, until when
let expiresAt = 0; // by this page's clock: receipt time + expiresIn, immune to clock skew
let failures = 0; // tries in a row that found the service unavailable
let refreshTimer = null;
let retryTimer = null;
let countdownTimer = null;
let lockReleases = 0; // how many times another tab has said it left the lock
let heardRelease = () => {}; // wakes a tab waiting for that word

const $ = (id) => document.getElementById(id);

// ---- Talking to the service ---------------------------------------------------------------

// Send one request and log its answer. `token` sends the access token; `cookie` sends the
// refresh cookie's CSRF proof, with these body fields. A network error is status 0.
async function send(method, path, { token, cookie, fields } = {}) {
  const headers = {};
  let body = fields;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (cookie) {
    // The double-submit cookie (OWASP CSRF Prevention Cheat Sheet): only our page can read it.
    headers["X-CSRF-Token"] = csrfToken();
    body = { ...fields, refreshTokenTransport: "cookie" };
  }
  if (body) headers["Content-Type"] = "application/json";
  const answer = { status: 0, ok: false, body: {}, retryAfter: 0 };
  try {
    const response = await fetch(path, {
      method, headers, body: body && JSON.stringify(body), credentials: "same-origin",
    });
    answer.status = response.status;
    answer.ok = response.ok;
    answer.retryAfter = Number(response.headers.get("Retry-After")) || 0;
    if (response.headers.get("Content-Type")?.startsWith("application/json")) {
      answer.body = await response.json();
    }
  } catch {
    answer.status = 0; // no answer at all: the network, or a reply cut short
  }
  const outcome = answer.status ? `${answer.status} ${answer.body.error ?? ""}` : "no answer";
  log(`${method} ${path} → ${outcome.trim()}`, answer.ok ? "request" : "request failed");
  return answer;
}

// A 4xx from /token or /logout means the service refused the session. A 5xx or no answer says
// nothing about the session: it may well be alive, so the page keeps it and tries again.
const unavailable = (answer) => answer.status === 0 || answer.status >= 500;

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrf_token=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

// Call an API route with the access token. RFC 6750 §3.1: a 401 says this access token does
// not count (expired, or its session ended). Refresh once and retry once; a second 401 means
// the session is over.
async function api(method, path) {
  const sent = accessToken;
  const answer = await send(method, path, { token: sent });
  if (answer.status !== 401) return answer;
  if ((await refresh("after a 401", sent)) !== "refreshed") return answer;
  const retried = await send(method, path, { token: accessToken });
  if (retried.status === 401) {
    showLoggedOut("The service refused a fresh access token too. Log in again.");
  }
  return retried;
}

// ---- Refreshing, one tab at a time --------------------------------------------------------

// Every request that sends the refresh cookie runs under one lock shared by all this site's
// tabs (Web Locks API): two tabs refreshing at once would both present the same refresh token,
// which looks like theft (RFC 9700 §4.14.2). Web Locks need https or localhost; elsewhere each
// tab goes alone, and the service's grace window for a just-spent token covers the race.
//
// A tab leaving the lock tells the others so, after any news (a new token, a logout). The lock
// can reach a waiting tab before those words do (they travel apart), so a tab that found the
// lock taken waits for the word, up to a second, before it looks at what it holds.
function oneTabAtATime(task) {
  if (!navigator.locks) return task();
  const releasesBefore = lockReleases;
  return navigator.locks.request(LOCK, { ifAvailable: true }, (lock) => {
    if (lock) return holdingTheLock(task);
    // Another tab holds the lock: wait for it, then for its word.
    return navigator.locks.request(LOCK, async () => {
      if (lockReleases === releasesBefore) await wordOfRelease();
      return holdingTheLock(task);
    });
  });
}

async function holdingTheLock(task) {
  try {
    return await task();
  } finally {
    tabs.postMessage({ type: "released" });
  }
}

function wordOfRelease() {
  return new Promise((resolve) => {
    heardRelease = resolve;
    setTimeout(resolve, 1000); // a tab closed while holding the lock says nothing
  });
}

// Trade the refresh cookie for a new access token. `spent` is the token this tab found
// wanting: if the token changed while we waited for the lock, another tab has refreshed and
// sent us its token, so there is nothing left to do. Answers "refreshed", "ended" or "unavailable".
function refresh(reason, spent = accessToken) {
  return oneTabAtATime(async () => {
    if (accessToken !== spent) {
      if (!accessToken) return "ended"; // another tab logged out while we waited
      log("Another tab refreshed while this one waited: this tab uses its new access token.");
      return "refreshed";
    }
    const answer = await send("POST", "/token", { cookie: true });
    if (answer.ok) {
      useTokens(answer.body.accessToken, answer.body.expiresIn);
      tellOtherTabs();
      setStatus(`Logged in. Refreshed ${reason}.`);
      log(`Refreshed ${reason}: a new access token, and the refresh cookie rotated.`, "refresh");
      return "refreshed";
    }
    if (unavailable(answer)) {
      tryAgainLater(reason, answer);
      return "unavailable";
    }
    sessionOver(answer);
    return "ended";
  });
}

// The service refused the refresh cookie: the session has ended (logged out elsewhere, ended
// from another device, expired, or reuse detected). Every tab of this browser shares it.
function sessionOver(answer) {
  forgetSession();
  showLoggedOut(sessionOverMessage(answer.body.message));
  tabs.postMessage({ type: "logged-out" });
}

// The service's message is a sentence of its own, shown as it is. A refresh token signed with
// a key the service no longer holds most often means it restarted with new random secrets
// (no ACCESS_TOKEN_SECRET or REFRESH_TOKEN_SECRET set): say that in the user's words.
const UNKNOWN_KEY = "signed with a key this service does not hold";

function sessionOverMessage(message) {
  if (message?.includes(UNKNOWN_KEY)) return "The server restarted, so log in again.";
  return message ?? "The service ended the session. Log in again.";
}

// The service is down (a 503 with Retry-After, or no answer): keep the session and try
// again, waiting twice as long each time, up to MAX_RETRY_DELAY seconds.
function tryAgainLater(reason, answer) {
  failures += 1;
  const delay = Math.max(answer.retryAfter, Math.min(MAX_RETRY_DELAY, 2 ** failures));
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => refresh(reason), delay * 1000);
  const what = unavailableMessage(answer);
  setStatus(`${what} You are still logged in; this page tries again in ${delay} s.`, "warning");
}

const NO_ANSWER = "The service did not answer: it may be down, or the network is.";

function unavailableMessage(answer) {
  if (!answer.status) return "The service did not answer.";
  return `The service is unavailable (it answered ${answer.status}).`;
}

// Give the other tabs the fresh access token, with what is left of its life, so that they
// neither refresh again nor log in again.
function tellOtherTabs() {
  const expiresIn = (expiresAt - Date.now()) / 1000;
  tabs.postMessage({ type: "tokens", accessToken, expiresIn });
}

tabs.addEventListener("message", ({ data }) => {
  if (data.type === "tokens") {
    const wasLoggedIn = Boolean(accessToken);
    useTokens(data.accessToken, data.expiresIn);
    setStatus(wasLoggedIn ? "Logged in. Another tab refreshed." : "Logged in, in another tab.");
  } else if (data.type === "logged-out") {
    showLoggedOut("Logged out in another tab.");
  } else if (data.type === "released") {
    lockReleases += 1;
    heardRelease();
  }
});

// ---- What the buttons do ------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const fields = { email: $("email").value, password: $("password").value };
  const answer = await send("POST", "/login", { cookie: true, fields });
  if (!answer.ok) {
    return setStatus(answer.status ? answer.body.message : NO_ANSWER, "error");
  }
  useTokens(answer.body.accessToken, answer.body.expiresIn);
  tellOtherTabs();
  setStatus("Logged in.");
  log("Logged in: access token in memory, refresh token in an HttpOnly cookie.");
  await callMe();
}

async function callMe() {
  $("me").textContent = "(calling…)";
  const answer = await api("GET", "/me");
  $("me").textContent = answer.status
    ? `HTTP ${answer.status}\n${JSON.stringify(answer.body, null, 2)}`
    : NO_ANSWER;
  if (unavailable(answer)) {
    const what = unavailableMessage(answer);
    setStatus(`${what} You are still logged in: try again in a moment.`, "warning");
  }
}

// The page cannot move the service's clock, so it does to its copy of the token what time
// would do: the `exp` claim becomes now. The page cannot sign that change (RFC 7515 §5.2: any
// change breaks the signature), so the service refuses the token with 401, as it refuses an
// expired one, and the next call shows the 401 → refresh → retry path.
function letItExpire() {
  const [header, , signature] = accessToken.split(".");
  claims = { ...claims, exp: Math.floor(Date.now() / 1000) };
  accessToken = [header, encodePart(claims), signature].join(".");
  expiresAt = Date.now();
  clearTimeout(refreshTimer); // else the silent refresh would save it
  showToken();
  showCountdown();
  setStatus("The access token has expired on this page. Call GET /me to see what follows.");
  log("Let it expire: this page set its copy's exp to now; the signature no longer matches.");
}

// Log out with the refresh cookie. "local" ends this session, "others" every other one of
// this user's sessions. The service clears the cookies unless the scope is "others".
async function logout(scope) {
  const request = () => send("POST", "/logout", { cookie: true, fields: { scope } });
  const answer = await oneTabAtATime(request);
  if (unavailable(answer)) {
    const what = unavailableMessage(answer);
    return setStatus(`${what} Nothing was ended: try again in a moment.`, "warning");
  }
  if (!answer.ok) return sessionOver(answer); // no session left to log out of
  if (scope === "others") {
    log("Logged out everywhere else: every other session of this account has ended.");
    return loadSessions();
  }
  log(`Logged out (HTTP ${answer.status}): the service ended the session and cleared the cookies.`);
  showLoggedOut("Logged out.");
  tabs.postMessage({ type: "logged-out" });
}

// End another session, a browser elsewhere: its refresh and access tokens stop working at once.
async function endSession(id) {
  const answer = await api("DELETE", `/sessions/${encodeURIComponent(id)}`);
  if (answer.status === 204) log("Ended a session: its tokens stop working at once.");
  await loadSessions();
}

async function loadSessions() {
  const answer = await api("GET", "/sessions");
  if (answer.ok) showSessions(answer.body.sessions);
}

// ---- Showing it ---------------------------------------------------------------------------

// Keep a new access token, show it, and plan the silent refresh before it expires.
function useTokens(token, expiresIn) {
  const wasLoggedIn = Boolean(accessToken);
  accessToken = token;
  claims = decodePart(token.split(".")[1]);
  expiresAt = Date.now() + expiresIn * 1000;
  failures = 0;
  clearTimeout(retryTimer);
  clearTimeout(refreshTimer);
  const lead = (claims.exp - claims.iat) * REFRESH_BEFORE_EXPIRY * 1000;
  refreshTimer = setTimeout(() => refresh("silently"), Math.max(0, expiresAt - lead - Date.now()));
  showToken();
  showCountdown();
  if (!wasLoggedIn) showLoggedIn();
}

function showLoggedIn() {
  $("login").hidden = true;
  $("session").hidden = false;
  clearInterval(countdownTimer);
  countdownTimer = setInterval(showCountdown, 1000);
  loadSessions();
}

function showLoggedOut(status) {
  clearTimeout(refreshTimer);
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  accessToken = null;
  claims = null;
  $("session").hidden = true;
  $("login").hidden = false;
  $("me").textContent = "(not called yet)";
  $("sessions").replaceChildren();
  $("logout-others").hidden = true;
  setStatus(status);
}

// The session is over: drop its CSRF cookie, so the next visit does not try to restore it.
// (The HttpOnly refresh cookie is out of this script's reach, and useless without it.)
function forgetSession() {
  document.cookie = "csrf_token=; Max-Age=0; Path=/; SameSite=Strict";
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function showToken() {
  const header = decodePart(accessToken.split(".")[0]);
  $("token-header").textContent = JSON.stringify(header, null, 2);
  $("token-claims").textContent = JSON.stringify(claims, null, 2);
  const time = (seconds) => new Date(seconds * 1000).toLocaleTimeString();
  $("token-times").textContent =
    `Issued at ${time(claims.iat)} (iat), expires at ${time(claims.exp)} (exp), your local time.`;
}

function showCountdown() {
  const left = Math.max(0, Math.round((expiresAt - Date.now()) / 1000));
  const seconds = String(left % 60).padStart(2, "0");
  $("countdown").textContent = `${Math.floor(left / 60)}:${seconds}`;
}

// One row per session. Built with textContent, never innerHTML: the user agent is whatever
// the other browser sent, and must not become markup (OWASP XSS Prevention Cheat Sheet).
function showSessions(sessions) {
  const rows = sessions.map((session) => {
    const row = document.createElement("tr");
    const device = cell(deviceName(session.userAgent));
    device.title = session.userAgent; // the whole User-Agent, on hover
    if (session.current) {
      row.className = "current";
      const mark = document.createElement("strong");
      mark.textContent = "This session";
      device.prepend(mark, " ");
    }
    const end = document.createElement("button");
    end.type = "button";
    end.textContent = "End";
    // Ending this session is logging out: the service then clears the cookies too.
    end.addEventListener("click", () => {
      if (session.current) logout("local");
      else endSession(session.id);
    });
    // "Ends if unused": the idle deadline, which each use moves on; else the absolute one.
    const ends = session.idleExpiresAt ?? session.expiresAt;
    const buttonCell = cell("");
    buttonCell.append(end);
    row.append(device, cell(session.ip), cell(when(session.createdAt)),
      cell(when(session.lastUsedAt)), cell(when(ends)), buttonCell);
    // On a narrow screen each cell shows its column's name (style.css stacks the rows).
    [...row.children].forEach((td, index) => { td.dataset.label = COLUMNS[index]; });
    return row;
  });
  $("sessions").replaceChildren(...rows);
  // Only another session can be logged out "everywhere else".
  $("logout-others").hidden = !sessions.some((session) => !session.current);
}

// "Firefox on Windows": enough of a User-Agent to tell sessions apart. Order matters: Edge's
// User-Agent also names Chrome and Safari, and Android's names Linux.
const BROWSERS = [["Firefox", "Firefox"], ["Edg", "Edge"], ["OPR", "Opera"], ["Chrome", "Chrome"],
  ["Safari", "Safari"]];
const SYSTEMS = [["Windows", "Windows"], ["Android", "Android"], ["iPhone", "iPhone"],
  ["iPad", "iPad"], ["Mac OS X", "macOS"], ["CrOS", "ChromeOS"], ["Linux", "Linux"]];

function deviceName(userAgent) {
  const browser = BROWSERS.find(([token]) => userAgent.includes(`${token}/`))?.[1];
  const system = SYSTEMS.find(([token]) => userAgent.includes(token))?.[1];
  if (!browser) return userAgent || "(unknown)";
  return system ? `${browser} on ${system}` : browser;
}

const COLUMNS = [...document.querySelectorAll("thead th")].map((th) => th.textContent);

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function when(rfc3339) {
  const parts = { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" };
  return new Date(rfc3339).toLocaleString([], parts);
}

function log(message, kind) {
  const item = document.createElement("li");
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  const text = document.createElement("span");
  text.textContent = message;
  item.append(time, " ", text);
  if (kind) item.className = kind;
  $("history").hidden = false; // drawn once something has happened
  $("log").append(item);
  while ($("log").children.length > LOG_LENGTH) $("log").firstElementChild.remove();
  $("log").scrollTop = $("log").scrollHeight;
}

// A JWT's parts are base64url JSON (RFC 7515 §2).
function decodePart(part) {
  const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")));
}

function encodePart(object) {
  return btoa(JSON.stringify(object)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// ---- The start ----------------------------------------------------------------------------

$("login").addEventListener("submit", login);
$("call-me").addEventListener("click", callMe);
$("refresh-now").addEventListener("click", () => refresh("on request"));
$("let-it-expire").addEventListener("click", letItExpire);
$("logout").addEventListener("click", () => logout("local"));
$("logout-others").addEventListener("click", () => logout("others"));

// A CSRF cookie means this browser holds a session (a reload, a new tab): restore it with the
// refresh cookie instead of asking for the password again.
if (csrfToken()) {
  $("login").hidden = true;
  setStatus("Restoring your session…");
  refresh("to restore the session");
}
