// The Express example this service ports, as the tutorial has it, plus three additions for
// the benchmark (bench/run.py), each marked "bench addition" below:
//   1. authenticateUser(), which the tutorial leaves undefined: one demo user.
//   2. GET /me: the usual Express Bearer middleware, one jwt.verify with ACCESS_TOKEN_SECRET.
//   3. SEED_SESSIONS=N pre-fills the refreshTokens list with N distinct signed tokens.
// Everything else (routes, status codes, the list scanned by includes() and filter()) is as
// in the tutorial. PORT sets the port (default 3000). JWT_KEYOBJECT=1 is the second peer:
// the same code with key objects in place of string secrets, jsonwebtoken's fast path.
const crypto = require('crypto');
const express = require('express');
const jwt = require('jsonwebtoken');
const app = express();
app.use(express.json());

// Secret keys (should be stored in environment variables)
let ACCESS_TOKEN_SECRET = process.env.ACCESS_TOKEN_SECRET || 'your-access-token-secret';
let REFRESH_TOKEN_SECRET = process.env.REFRESH_TOKEN_SECRET || 'your-refresh-token-secret';
// Bench variant, off by default: JWT_KEYOBJECT=1 rebinds the two constants above to
// pre-built crypto KeyObjects. jsonwebtoken 9 otherwise tries createPrivateKey/createPublicKey
// on the string secret on EVERY sign/verify (fails, then falls back to createSecretKey), which
// on Node 20 / OpenSSL 3 costs ~350 us per call (auth0/node-jsonwebtoken#966, #944, #1046).
// The default passes strings, as the tutorial does.
if (process.env.JWT_KEYOBJECT === '1') {
  ACCESS_TOKEN_SECRET = crypto.createSecretKey(Buffer.from(ACCESS_TOKEN_SECRET));
  REFRESH_TOKEN_SECRET = crypto.createSecretKey(Buffer.from(REFRESH_TOKEN_SECRET));
  console.log('JWT_KEYOBJECT=1: secrets passed to jsonwebtoken as KeyObjects');
}

// In a real-world application, the refresh tokens should be stored in a secure database
let refreshTokens = [];

// --- bench addition 1: authenticateUser (not defined in the tutorial) -------------
// One hard-coded demo user. Comparison is "constant-time-ish": both sides are
// SHA-256'd to equal-length buffers and compared with crypto.timingSafeEqual (the
// '&' is non-short-circuit so the password compare runs even if the email differs).
// NOTE: plain-text demo password, no bcrypt/scrypt -- /login is NOT a benchmarked path.
// Demo id is a fixed-width string so seeded tokens have exactly the same length
// (and same 36-char header prefix) as real ones -> includes() does real compares.
const DEMO_USER = { id: 'u0000000', email: 'demo@example.com', password: 'demo-password' };
const sha = (s) => crypto.createHash('sha256').update(String(s)).digest();
function authenticateUser(email, password) {
  const ok = crypto.timingSafeEqual(sha(email), sha(DEMO_USER.email)) &
             crypto.timingSafeEqual(sha(password), sha(DEMO_USER.password));
  return ok ? { id: DEMO_USER.id } : null;
}

// --- bench addition 3: SEED_SESSIONS=N ---------------------------------------------
// N distinct refresh tokens signed exactly like /login does ({id}, REFRESH secret, no exp),
// ids 'u0000001'.. so every token has the same length as the demo user's token.
// A token obtained from /login afterwards is pushed to the END of the array, so the
// benchmarked /token call is the worst case (full scan) -- also the "newest session" case.
const SEED_SESSIONS = parseInt(process.env.SEED_SESSIONS || '0', 10);
if (SEED_SESSIONS > 0) {
  // Fill is signed with a KeyObject made from the same secret: the token strings are
  // byte-identical to string-secret signing, but 1M fills take seconds instead of ~6 min.
  const seedKey = crypto.createSecretKey(Buffer.from(process.env.REFRESH_TOKEN_SECRET || 'your-refresh-token-secret'));
  const t0 = process.hrtime.bigint();
  for (let i = 1; i <= SEED_SESSIONS; i++) {
    refreshTokens.push(jwt.sign({ id: 'u' + String(i).padStart(7, '0') }, seedKey));
  }
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`seeded ${refreshTokens.length} refresh tokens in ${ms.toFixed(0)} ms`);
}

app.post('/login', (req, res) => {
  const { email, password } = req.body;

  // Validate and authenticate the user
  const user = authenticateUser(email, password);
  if (!user) {
    return res.status(401).send('Unauthorized');
  }

  // Create an access token and a refresh token
  const accessToken = jwt.sign({ id: user.id }, ACCESS_TOKEN_SECRET, { expiresIn: '15m' });
  const refreshToken = jwt.sign({ id: user.id }, REFRESH_TOKEN_SECRET);

  // Save the refresh token
  refreshTokens.push(refreshToken);

  // Return the tokens
  res.status(200).send({ accessToken, refreshToken });
});

app.post('/token', (req, res) => {
  const { refreshToken } = req.body;

  // Ensure the refresh token exists
  if (!refreshToken || !refreshTokens.includes(refreshToken)) {
    return res.status(403).send('Forbidden');
  }

  // Verify the refresh token
  jwt.verify(refreshToken, REFRESH_TOKEN_SECRET, (err, user) => {
    if (err) {
      return res.status(403).send('Forbidden');
    }

    // Create a new access token
    const accessToken = jwt.sign({ id: user.id }, ACCESS_TOKEN_SECRET, { expiresIn: '15m' });

    // Return the new access token
    res.status(200).send({ accessToken });
  });
});

app.post('/logout', (req, res) => {
  const { refreshToken } = req.body;

  // Remove the refresh token
  refreshTokens = refreshTokens.filter(token => token !== refreshToken);

  // Return success status
  res.status(204).send();
});

// --- bench addition 2: protected route, standard Express Bearer pattern ------------
function authenticateToken(req, res, next) {
  const authHeader = req.headers['authorization'];
  const token = authHeader && authHeader.split(' ')[1];
  if (token == null) return res.sendStatus(401);

  jwt.verify(token, ACCESS_TOKEN_SECRET, (err, user) => {
    if (err) return res.sendStatus(403);
    req.user = user;
    next();
  });
}

app.get('/me', authenticateToken, (req, res) => {
  res.status(200).send({ id: req.user.id });
});

const PORT = parseInt(process.env.PORT || '3000', 10);
app.listen(PORT, '127.0.0.1', () => {
  console.log(`Server is running on port ${PORT}`);
});
