-- The users of the cluster's pop3d instances (pop3d --passdb-sql), made once when the
-- database is created (images/postgres/entrypoint.sh runs /docker-entrypoint-initdb.d/*.sql at the
-- first start, as the official postgres image does).
--
-- pop3d runs one query per login, by default
--     SELECT password, mailbox FROM users WHERE username = %(user)s
-- password: the second field of a passwd-file line ({ARGON2ID}..., {BLF-CRYPT}...,
--           {SHA512-CRYPT}..., {PLAIN}...): docs/cluster.md shows how to make one
-- mailbox:  the Maildir under the mail root (NULL: the user name)

-- pop3d's own role may only read the table.  Its password is the secret pop3d reads too.
\set pop3d_password `cat /run/secrets/pop3d-db-password`
CREATE ROLE pop3d LOGIN PASSWORD :'pop3d_password';

CREATE TABLE users (
    username text PRIMARY KEY,
    password text NOT NULL,
    mailbox  text
);
GRANT SELECT ON users TO pop3d;

-- The demo user: password "demo", the Maildir demo (with a welcome message: setup.sh).
INSERT INTO users (username, password, mailbox) VALUES (
    'demo',
    '{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$tDwpXAnseVpp9Uc/zdOC3w$oHSjrs0vYZjKcttijUgG++B1vZ+PWhLnpLnDmtZEdGY',
    'demo'
);
