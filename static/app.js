// The browser side of the cookie flow. The access token is kept in a variable, never in
// localStorage (OWASP HTML5 Security Cheat Sheet); the refresh token never reaches this script.
"use strict";

const REFRESH_BEFORE_EXPIRY = 0.2; // refresh when a fifth of the access token's life is left
let accessToken = null;
let expiresAt = 0; // by this page's clock: login time + expiresIn, immune to clock skew
let refreshTimer = null;
let countdownTimer = null;

const $ = (id) => document.getElementById(id);

function log(message, kind) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}: ${message}`;
  if (kind) item.className = kind;
  $("log").prepend(item);
}

function csrfToken() {
  // The double-submit cookie (OWASP CSRF Prevention Cheat Sheet): readable by this page only.
  const match = document.cookie.match(/(?:^|;\s*)csrf_token=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

function decodePart(part) {
  const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")));
}

// Every call says "refreshTokenTransport": "cookie": the refresh token travels in the cookie.
async function post(path, fields = {}) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify({ ...fields, refreshTokenTransport: "cookie" }),
    credentials: "same-origin",
  });
}

function useTokens(answer) {
  accessToken = answer.accessToken;
  expiresAt = Date.now() + answer.expiresIn * 1000;
  const [header, claims] = accessToken.split(".").slice(0, 2).map(decodePart);
  $("token-header").textContent = JSON.stringify(header, null, 2);
  $("token-claims").textContent = JSON.stringify(claims, null, 2);
  clearTimeout(refreshTimer);
  const lead = answer.expiresIn * REFRESH_BEFORE_EXPIRY * 1000;
  refreshTimer = setTimeout(() => refresh("silently"), Math.max(0, expiresAt - lead - Date.now()));
  showCountdown();
}

function showCountdown() {
  const left = Math.max(0, Math.round((expiresAt - Date.now()) / 1000));
  $("countdown").textContent = `${left} s`;
}

async function login(event) {
  event.preventDefault();
  const answer = await post("/login", { email: $("email").value, password: $("password").value });
  const body = await answer.json();
  if (!answer.ok) return log(`Login refused: ${body.message}`, "error");
  useTokens(body);
  $("login").hidden = true;
  $("session").hidden = false;
  $("status").textContent = "Logged in.";
  countdownTimer = setInterval(showCountdown, 1000);
  log("Logged in: access token in memory, refresh token in an HttpOnly cookie.");
  await callMe();
}

async function refresh(how) {
  const answer = await post("/token");
  const body = await answer.json();
  if (!answer.ok) {
    log(`Refresh refused: ${body.message}`, "error");
    return endSession("Session over. Log in again.");
  }
  useTokens(body);
  $("status").textContent = `Refreshed ${how}.`;
  log(`Refreshed ${how}: a new access token, and the refresh cookie rotated.`, "refresh");
}

async function callMe() {
  const answer = await fetch("/me", { headers: { Authorization: `Bearer ${accessToken}` } });
  const body = await answer.json();
  $("me").textContent = `HTTP ${answer.status}\n${JSON.stringify(body, null, 2)}`;
  log(`GET /me answered ${answer.status}.`, answer.ok ? undefined : "error");
}

async function logout() {
  const answer = await post("/logout");
  log(`Logged out (HTTP ${answer.status}): the server ended the session and cleared the cookies.`);
  endSession("Logged out.");
}

function endSession(status) {
  clearTimeout(refreshTimer);
  clearInterval(countdownTimer);
  accessToken = null;
  $("status").textContent = status;
  $("session").hidden = true;
  $("login").hidden = false;
}

$("login").addEventListener("submit", login);
$("call-me").addEventListener("click", callMe);
$("refresh-now").addEventListener("click", () => refresh("on request"));
$("logout").addEventListener("click", logout);
