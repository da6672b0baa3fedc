"""The project's exception hierarchy.

Adapters translate library errors into these, and say whether a failure is *retriable* (a server is
down or overloaded: pause and try again) or permanent (bad input, missing key: dead-letter or
reject). Consumers decide between retry, pause and dead-letter from that flag alone. No message
text and no key material ever goes into an exception message.
"""

from __future__ import annotations


class SealstreamError(Exception):
    """Base class of every error Sealstream raises on purpose."""

    retriable: bool = False


class InvalidMessage(SealstreamError):
    """A record or request can never be processed as it is (schema, size, encoding)."""


class DecryptionError(SealstreamError):
    """An envelope could not be opened: wrong key, wrong version, wrong ids, or tampered bytes.

    Deliberately one type with one message for every cause, so that a caller (or an attacker
    probing the API) learns nothing about *why* it failed.
    """

    def __init__(self) -> None:
        super().__init__("message envelope could not be decrypted or authenticated")


class KeyNotFound(SealstreamError):
    """No chat, or no DEK version, exists for the ids given."""


class KeyDestroyed(SealstreamError):
    """The DEK version existed but was destroyed (crypto-shredded)."""


class MessageGone(KeyDestroyed):
    """A fetched row's DEK version was destroyed and the message has been deleted since
    (`reader.service.EnvelopeOpener`): the message is gone, not the chat. A `KeyDestroyed`, so
    every path that skips unreadable rows skips it; the reader answers 404 for it, not 410."""


class KmsError(SealstreamError):
    """The KMS refused a request for a permanent reason (auth, permission, bad ciphertext)."""


class KmsKeyUnusable(KmsError):
    """The KMS refused one master key or one wrapped DEK for good (Transit answers 400: the
    master key does not exist, or the wrapped DEK does not authenticate under it and its
    context). Only records that need that key fail; other chats' keys still work, so a consumer
    dead-letters those records instead of holding the stage. A refusal of the whole KMS (token,
    policy, missing mount) stays a plain `KmsError`: every record would fail alike, so the stage
    holds and retries until an operator fixes it."""


class KmsUnavailable(SealstreamError):
    """The KMS could not be reached or kept failing after retries; try again later."""

    retriable = True


class StoreUnavailable(SealstreamError):
    """A storage server (Postgres, Cassandra, Redis, OpenSearch, Kafka) could not be reached."""

    retriable = True


class WorkerIdUnavailable(StoreUnavailable):
    """This process holds no worker-id lease known to be valid (Postgres unreachable, lease lost
    to another process, or every id taken), so it may not make message ids; try again later."""


class WorkerIdConflict(SealstreamError):
    """The explicitly configured worker id (SEALSTREAM_WORKER_ID) is leased by a live process."""


class MembershipRefused(SealstreamError):
    """A participant change the chat cannot take: removing its last participant (delete the chat
    instead) or adding one past the limit of 1,000 (the `chats` table's CHECK). Not retriable."""


class SealRefused(SealstreamError):
    """A record of the message topic can never be opened as it is: not sealed, a header missing
    or malformed, tampered bytes or a wrong binding (topic, record key, event id, key id, format
    version), or a topic key unknown, of another topic or destroyed. Permanent: the consumer
    dead-letters the record with `reason`, which names the header or field and never a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
