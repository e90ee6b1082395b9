//! modkit-outbox: transactional outbox engine (work in progress).
