#!/usr/bin/env bash
# Manual probe of server.mjs with curl: the exact request sequence recorded in README.md.
# Starts the server twice on a loopback port, prints every status code, the relevant
# response headers, and the decoded header + payload of every token kind.
# Needs: node (after `npm ci` here), curl, python3. Usage: ./probe.sh [port]
set -euo pipefail
cd "$(dirname "$0")"

PORT="${1:-38417}"
export PORT
export BETTER_AUTH_SECRET="${BETTER_AUTH_SECRET:-probe-secret-0123456789abcdef0123456789abcdef}"
export BETTER_AUTH_URL="http://127.0.0.1:${PORT}"
B="${BETTER_AUTH_URL}/api/auth"
J='Content-Type: application/json'
W="$(mktemp -d)"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$W"' EXIT

start_server() {
  node server.mjs >"$W/stdout" 2>"$W/stderr" &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    grep -q '^READY ' "$W/stdout" 2>/dev/null && break
    sleep 0.1
  done
  echo "server stdout: $(cat "$W/stdout")"
}

stop_server() {
  kill -TERM "$SERVER_PID"
  local rc=0
  wait "$SERVER_PID" || rc=$?
  echo "server exit code after SIGTERM: $rc"
  SERVER_PID=""
}

# hdr FILE NAME -> value of the first response header NAME (case-insensitive)
hdr() { grep -i "^$2:" "$1" | head -n1 | cut -d' ' -f2- | tr -d '\r'; }
# cookie FILE NAME -> value of Set-Cookie NAME (still URL-encoded, as sent)
cookie() { grep -i '^set-cookie:' "$1" | sed -n "s/^[Ss]et-[Cc]ookie: $2=\([^;]*\).*/\1/p" | head -n1; }
# json FILE KEY.PATH
json() { python3 -c 'import json,sys
v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"; }
decode() {
  python3 - "$1" "$2" <<'EOF'
import base64, json, sys, time
label, tok = sys.argv[1], sys.argv[2]
parts = tok.split(".")
d = lambda s: json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
h, p = d(parts[0]), d(parts[1])
print(f"  {label}: {len(parts)} dot-separated parts, {len(tok)} chars")
print("    header :", json.dumps(h))
print("    payload:", json.dumps(p))
if "exp" in p and "iat" in p:
    print(f"    lifetime exp-iat = {p['exp'] - p['iat']} s; exp - now = {p['exp'] - int(time.time())} s")
EOF
}

start_server

for who in alice bob; do
  echo
  echo "=================== $who"
  curl -sS -D "$W/su.h" -o "$W/su.b" -X POST "$B/sign-up/email" -H "$J" \
    -d "{\"email\":\"$who@example.com\",\"password\":\"correct-horse-battery\",\"name\":\"$who\"}" \
    -w "POST /sign-up/email -> %{http_code}\n"
  echo "  body keys: $(python3 -c 'import json,sys;print(sorted(json.load(open(sys.argv[1]))))' "$W/su.b")"
  RAW="$(json "$W/su.b" token)"
  SIGNED="$(hdr "$W/su.h" set-auth-token)"
  echo "  body.token        = $RAW"
  echo "  set-auth-token    = $SIGNED"
  echo "  session_token ck  = $(cookie "$W/su.h" better-auth.session_token)"
  echo "  user.id           = $(json "$W/su.b" user.id)"
  decode "session_data cookie (sign-up)" "$(cookie "$W/su.h" better-auth.session_data)"

  curl -sS -D "$W/si.h" -o "$W/si.b" -X POST "$B/sign-in/email" -H "$J" \
    -d "{\"email\":\"$who@example.com\",\"password\":\"correct-horse-battery\"}" \
    -w "POST /sign-in/email -> %{http_code}\n"
  echo "  body keys: $(python3 -c 'import json,sys;print(sorted(json.load(open(sys.argv[1]))))' "$W/si.b")"
  echo "  set-auth-token present: $([ -n "$(hdr "$W/si.h" set-auth-token)" ] && echo yes || echo no)"

  curl -sS -D "$W/tk.h" -o "$W/tk.b" "$B/token" -H "Authorization: Bearer $RAW" \
    -w "GET /token (Bearer body.token) -> %{http_code}\n"
  decode "/token JWT" "$(json "$W/tk.b" token)"
  curl -sS -o /dev/null "$B/token" -H "Authorization: Bearer $SIGNED" \
    -w "GET /token (Bearer set-auth-token) -> %{http_code}\n"
  curl -sS -o /dev/null "$B/token" -H "Cookie: better-auth.session_token=$(cookie "$W/su.h" better-auth.session_token)" \
    -w "GET /token (Cookie session_token) -> %{http_code}\n"

  curl -sS -D "$W/gs.h" -o "$W/gs.b" "$B/get-session" -H "Authorization: Bearer $RAW" \
    -w "GET /get-session (Bearer) -> %{http_code}\n"
  echo "  body: $(cat "$W/gs.b")"
  echo "  set-cookie names: $(grep -i '^set-cookie:' "$W/gs.h" | sed 's/^[^:]*: \([^=]*\)=.*/\1/' | tr '\n' ' ')"
  decode "set-auth-jwt (get-session)" "$(hdr "$W/gs.h" set-auth-jwt)"
  decode "session_data cookie (get-session)" "$(cookie "$W/gs.h" better-auth.session_data)"
done

echo
echo "=================== errors"
curl -sS -o /dev/null "$B/token" -w "GET /token no auth -> %{http_code}\n"
curl -sS "$B/get-session" -w " <- GET /get-session no auth -> %{http_code}\n"
curl -sS "$B/token" -H "Authorization: Bearer not-a-session" -w " <- GET /token bad bearer -> %{http_code}\n"
curl -sS -X POST "$B/sign-up/email" -H "$J" -H 'Origin: http://evil.example' \
  -d '{"email":"o1@example.com","password":"correct-horse-battery","name":"o"}' -w " <- sign-up Origin evil -> %{http_code}\n"
curl -sS -o /dev/null -X POST "$B/sign-up/email" -H "$J" -H "Origin: $BETTER_AUTH_URL" \
  -d '{"email":"o2@example.com","password":"correct-horse-battery","name":"o"}' -w "sign-up Origin = BETTER_AUTH_URL -> %{http_code}\n"
curl -sS -X POST "$B/sign-up/email" -H "$J" -H 'Cookie: a=b' \
  -d '{"email":"o3@example.com","password":"correct-horse-battery","name":"o"}' -w " <- sign-up with Cookie, no Origin -> %{http_code}\n"

echo
echo "=================== sign-out (last user) then reuse"
curl -sS -X POST "$B/sign-out" -H "Authorization: Bearer $RAW" -w " <- POST /sign-out (Bearer) -> %{http_code}\n"
curl -sS -o /dev/null "$B/token" -H "Authorization: Bearer $RAW" -w "GET /token after sign-out -> %{http_code}\n"

echo
echo "=================== JWKS"
curl -sS "$B/jwks" -o "$W/jwks1" -w "GET /jwks -> %{http_code}\n"
cat "$W/jwks1"; echo
stop_server

start_server
curl -sS "$B/jwks" -o "$W/jwks2" -w "GET /jwks after restart -> %{http_code}\n"
cat "$W/jwks2"; echo
python3 -c 'import json,sys
a=[k["kid"] for k in json.load(open(sys.argv[1]))["keys"]]; b=[k["kid"] for k in json.load(open(sys.argv[2]))["keys"]]
print("kid before:", a, "after:", b, "changed:", a != b)' "$W/jwks1" "$W/jwks2"
curl -sS -o /dev/null "$B/token" -H "Authorization: Bearer $RAW" -w "old session after restart -> %{http_code}\n"
stop_server
