// Tiny real Better Auth server for the Python end-to-end tests.
//
// Environment:
//   PORT                  port to listen on (127.0.0.1 only). 0 = pick a free port. Default 0.
//   BETTER_AUTH_SECRET    required. Signs session cookies, the HS256 cookie-cache JWT,
//                         and encrypts the JWKS private key.
//   BETTER_AUTH_URL       optional. Default http://127.0.0.1:<actual port>. Its origin is the
//                         `iss` and `aud` of /api/auth/token JWTs and the trusted Origin.
//   BA_JWT_SESSION_COOKIE_CACHE=1
//                         optional. Passes jwt({ sessionCookieCache: true }), which makes the
//                         better-auth.session_data cookie an asymmetric JWT signed with the
//                         JWKS key (typ better-auth.session-cache+jwt) instead of HS256.
//
// stdout carries exactly one line, `READY <port>`, once the server listens.
// Better Auth's own log lines go to stderr. SIGTERM/SIGINT closes the server, exit code 0.
// Everything is kept in memory (memory adapter), so each start gets fresh users and JWKS.

import http from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { toNodeHandler } from "better-auth/node";
import { bearer, jwt } from "better-auth/plugins";

// Telemetry is off by default, but BETTER_AUTH_TELEMETRY=1 in the environment would turn it
// on regardless of the option below (it is OR-ed). Force it off: this server must not
// reach the network.
process.env.BETTER_AUTH_TELEMETRY = "0";
delete process.env.BETTER_AUTH_TELEMETRY_ENDPOINT;

const secret = process.env.BETTER_AUTH_SECRET;
if (!secret) {
  process.stderr.write("server.mjs: BETTER_AUTH_SECRET is required\n");
  process.exit(2);
}
const requestedPort = Number.parseInt(process.env.PORT ?? "0", 10);
if (!Number.isInteger(requestedPort) || requestedPort < 0 || requestedPort > 65535) {
  process.stderr.write(`server.mjs: invalid PORT ${process.env.PORT}\n`);
  process.exit(2);
}

let handler = null;
const server = http.createServer((req, res) => {
  if (!handler) {
    res.statusCode = 503;
    res.end("not ready");
    return;
  }
  handler(req, res);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

server.listen(requestedPort, "127.0.0.1", () => {
  const port = server.address().port;
  const baseURL = process.env.BETTER_AUTH_URL || `http://127.0.0.1:${port}`;

  const auth = betterAuth({
    baseURL,
    secret,
    // The memory adapter needs every table to exist up front ("Model user not found" otherwise).
    database: memoryAdapter({ user: [], session: [], account: [], verification: [], jwks: [] }),
    emailAndPassword: { enabled: true, requireEmailVerification: false },
    session: {
      cookieCache: { enabled: true, strategy: "jwt", maxAge: 300 },
    },
    plugins: [
      jwt(process.env.BA_JWT_SESSION_COOKIE_CACHE === "1" ? { sessionCookieCache: true } : undefined),
      bearer(),
    ],
    // The default trusted origin is already the origin of baseURL; listed for clarity.
    trustedOrigins: [new URL(baseURL).origin],
    rateLimit: { enabled: false },
    telemetry: { enabled: false, debug: false },
    logger: {
      disableColors: true,
      log: (level, message, ...args) => {
        process.stderr.write(`[better-auth ${level}] ${message}${args.length ? " " + args.map(String).join(" ") : ""}\n`);
      },
    },
  });

  handler = toNodeHandler(auth);
  process.stdout.write(`READY ${port}\n`);
});
