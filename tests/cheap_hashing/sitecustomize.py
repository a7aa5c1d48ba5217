"""Cheap password hashing in the servers and commands a test starts.

conftest's `fast_password_hashing` does this in the test process; Python imports this module
at start-up in every process whose PYTHONPATH names this folder (conftest's `user_env`), before
`users` makes its PASSWORD_HASHER. The real parameters are tested in test_users.py, and the
memory bound on logins in test_attacks.py with `REAL_HASHING`.
"""

import argon2


class CheapPasswordHasher(argon2.PasswordHasher):
    """The parameters of conftest's fast_password_hashing, whatever the caller asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)


argon2.PasswordHasher = CheapPasswordHasher
