-- Migration 2: leases. Who may act on a shared thing until when: one
-- writer per upload (`upload:<id>`), one upload sweeper at a time
-- (`sweep:uploads`). Taken and renewed by one conditional upsert, so
-- replicas of one database never both hold one; an expired lease (its
-- holder died) is free again.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ns INTEGER NOT NULL
);
