"""Print an HS256 token for a user id, signed with the configured BETTER_AUTH_SECRET.

For trying the API without a frontend (curl, Swagger UI's Authorize button). Refuses to run with
ENVIRONMENT=production: a token minted from the production secret is a skeleton key.

    uv run python dev_token.py USER_ID [--minutes 60]
"""

import argparse
import sys
import time

import jwt

from config import get_settings


def mint_token(user_id: str, secret: str, minutes: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + minutes * 60}, secret, "HS256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--minutes", type=int, default=60)
    arguments = parser.parse_args()
    settings = get_settings()
    if settings.environment == "production":
        print("Refusing to mint a token with the production secret.", file=sys.stderr)
        return 2
    if not 1 <= arguments.minutes <= 7 * 24 * 60:
        print("--minutes must be between 1 and 10080 (a week).", file=sys.stderr)
        return 2
    print(mint_token(arguments.user_id, settings.better_auth_secret, arguments.minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
