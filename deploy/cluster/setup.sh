#!/bin/sh
# One-shot setup of the cluster's shared volumes (deploy/cluster/compose.yaml), run before the
# pop3d instances start; does nothing that is already done.
#   TLS_DIR   a self-signed certificate for localhost, for POP3S and STLS (replace it with a real one)
#   MAIL_DIR  the shared mail root: the demo user's Maildir with a welcome message
# Everything belongs to uid/gid 110, the pop3d user of the image.
set -eu
TLS_DIR=${TLS_DIR:-/tls}
MAIL_DIR=${MAIL_DIR:-/mail}
OWNER=${OWNER:-110:110}

if [ ! -s "$TLS_DIR/cert.pem" ] || [ ! -s "$TLS_DIR/key.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null
    echo "setup: made a self-signed certificate for localhost in $TLS_DIR"
fi
chown "$OWNER" "$TLS_DIR/cert.pem" "$TLS_DIR/key.pem"
chmod 600 "$TLS_DIR/key.pem"

if [ ! -e "$MAIL_DIR/.pop3d-cluster-setup" ]; then
    mkdir -p "$MAIL_DIR/demo/cur" "$MAIL_DIR/demo/new" "$MAIL_DIR/demo/tmp"
    printf '%s\n' \
        'From: pop3d <postmaster@localhost>' \
        'To: demo <demo@localhost>' \
        'Subject: Welcome to the pop3d cluster' \
        'Message-ID: <cluster-welcome@pop3d.invalid>' \
        '' \
        'Hello!' \
        '' \
        'This message went through HAProxy to one of three pop3d instances,' \
        'which found you in PostgreSQL and locked your mailbox in etcd.' \
        >"$MAIL_DIR/demo/new/1764115200.M1P1.pop3d-cluster"
    touch "$MAIL_DIR/.pop3d-cluster-setup"
    echo "setup: made the demo Maildir in $MAIL_DIR"
fi
chown -R "$OWNER" "$MAIL_DIR"
chmod 700 "$MAIL_DIR"
