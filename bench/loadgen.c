/*
 * loadgen: a fast single-threaded POP3 load generator for bench/run.py.
 *
 *   cc -O2 -Wall -Wextra -o loadgen bench/loadgen.c
 *   loadgen --host 127.0.0.1 --port PORT --mode MODE --users FILE
 *           [--concurrency C] [--sessions N] [--user-offset K] [--timeout S]
 *
 * MODE is churn, bulk, stat, idle or latency (see usage()).
 * One epoll loop drives every connection; each connection is a small state
 * machine (one command, wait for its reply, next command: no pipelining).
 * The results are one JSON object on one line on stdout (two for idle);
 * errors go to stderr (the first few in full, then only counted).  Exit
 * status: 0 with no errors and no mismatches, 1 otherwise, 2 for bad usage.
 *
 * The client must cost far less CPU than the server it measures, so the hot
 * path avoids needless syscalls: level-triggered epoll with EPOLLIN only (the
 * greeting tells us that a connect succeeded, and EPOLLERR/EPOLLHUP that it
 * failed), one recv per event unless the buffer came back full, and EPOLLOUT
 * only in the rare case that a command does not fit the socket buffer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF_SIZE (256 * 1024) /* one shared read buffer: all parsing is incremental */
#define LINE_CAP 1024          /* status and LIST lines (RFC 1939: at most 512 octets) */
#define ARG_MAX_LEN 255        /* user names and passwords */
#define OUT_CAP (ARG_MAX_LEN + 16)
#define MAX_SHOWN 10           /* errors (and mismatches) printed in full */
#define NOOP_INTERVAL 60.0     /* idle: keeps a server's idle timeout from firing */
#define QUIT_WAIT 10.0         /* idle: how long the QUIT replies may take */
#define STDIN_TAG UINT64_MAX   /* epoll tag of fd 0 (idle mode) */
#define MAX_EVENTS 512

enum mode { M_NONE = -1, M_CHURN, M_BULK, M_STAT, M_IDLE, M_LATENCY };
static const char *const mode_names[] = {"churn", "bulk", "stat", "idle", "latency"};

/* What a connection waits for; S_FREE: no connection in this slot. */
enum state { S_FREE, S_GREETING, S_USER, S_PASS, S_STAT, S_LIST, S_RETR, S_NOOP, S_QUIT, S_IDLE, S_CLOSING };
static const char *const state_names[] = {
    "-", "greeting", "USER", "PASS", "STAT", "LIST", "RETR", "NOOP", "QUIT", "idle", "close after QUIT",
};

/* Which part of a reply is being read. */
enum rphase { R_STATUS, R_LISTDATA, R_RETRDATA };

/* RETR data parser: at the beginning of a line, after a leading '.', after
 * ".\r" (the terminator if '\n' follows), or inside a line. */
enum dstate { D_BOL, D_DOT, D_DOTCR, D_MID };

struct msg {
    uint64_t num, size; /* as LIST gave them */
};

struct conn {
    int fd;
    uint32_t gen; /* bumped at each close, so stale epoll events are recognised */
    enum state st;
    enum rphase rp;
    enum dstate ds;
    bool want_out;  /* EPOLLOUT registered: a command is partly sent */
    bool in_setup;  /* idle: counted in setup_active */
    bool quitting;  /* idle: send QUIT once the NOOP in flight is answered */
    int user;
    unsigned round; /* churn: sessions this slot has started */
    double t0;      /* when the connect started */
    size_t llen, olen, ooff;
    struct msg *msgs; /* bulk: the LIST, kept allocated across sessions */
    size_t nmsg, msgcap, next;
    uint64_t got; /* payload octets of the RETR being read */
    char line[LINE_CAP];
    char out[OUT_CAP];
};

struct user {
    char *name, *pass;
};

static struct {
    enum mode mode;
    const char *host, *port, *users_path;
    long conc, sessions, offset;
    double timeout;
} opt = {.mode = M_NONE, .host = "127.0.0.1", .conc = -1, .sessions = 1000, .timeout = 120};

static struct user *users;
static long nusers; /* after --user-offset */
static struct conn *conns;
static long nconns;
static int epfd;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static char rbuf[RBUF_SIZE];

static long started, active, ok_sessions, errors, shown, slot_per;
static bool stopping; /* timed out: start nothing more */
static double *lat;   /* churn, latency: per-session milliseconds */
static long nlat;
static long messages, mismatches, mism_shown; /* bulk */
static uint64_t bytes;
static double last_quit, last_quit_cpu;
static double stat_time, stat_cpu; /* stat */
static uint64_t stat_count, stat_size;
static bool stat_seen;
static long setup_active, logged_in, closed_ok; /* idle */
static bool holding, stdin_eof;
static double next_noop;

static void conn_finish(struct conn *c, bool ok);

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(status);
}

/* Count one error; print only the first few, since thousands would drown the rest. */
static void vnote_error(int user, enum state st, const char *fmt, va_list ap)
{
    errors++;
    if (shown >= MAX_SHOWN)
        return;
    fprintf(stderr, "loadgen: error: user %s, %s: ", users[user].name, state_names[st]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    if (++shown == MAX_SHOWN)
        fputs("loadgen: (further errors are only counted)\n", stderr);
}

static void note_error(int user, enum state st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vnote_error(user, st, fmt, ap);
    va_end(ap);
}

/* An error ends its session: count it, close the connection. */
static void conn_fail(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vnote_error(c->user, c->st, fmt, ap);
    va_end(ap);
    conn_finish(c, false);
}

static uint64_t conn_tag(const struct conn *c)
{
    return (uint64_t)c->gen << 32 | (uint64_t)(c - conns);
}

static void set_events(struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = conn_tag(c)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die(2, "epoll_ctl: %s", strerror(errno));
}

/* Start a session on c as user u: a non-blocking connect, then wait for the greeting. */
static bool conn_start(struct conn *c, int u)
{
    c->user = u;
    c->t0 = now_s();
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        note_error(u, S_GREETING, "socket: %s", strerror(errno));
        return false;
    }
    /* No TCP_NODELAY: there is never unacknowledged data when a command is
     * sent (the reply acknowledged the last one), so Nagle never delays us. */
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        note_error(u, S_GREETING, "connect: %s", strerror(errno));
        close(fd);
        return false;
    }
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = conn_tag(c)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die(2, "epoll_ctl: %s", strerror(errno));
    c->st = S_GREETING;
    c->rp = R_STATUS;
    c->llen = c->olen = c->ooff = 0;
    c->nmsg = c->next = 0;
    c->want_out = c->quitting = false;
    active++;
    return true;
}

/* churn, latency: start the slot's next session; a failed start is an error,
 * and the slot moves on (a loop, not recursion, so failures cannot pile up). */
static void slot_next(struct conn *c)
{
    long slot = c - conns;
    while (!stopping && started < opt.sessions) {
        /* Each slot has its own users (slot, slot+C, ... below slot_per*C), so
         * two sessions at once never share a mailbox (the server locks it). */
        int u = (int)(slot + (long)(c->round++ % (unsigned long)slot_per) * opt.conc);
        started++;
        if (conn_start(c, u))
            return;
    }
}

/* idle: start sessions until C are being set up at once, or all were started. */
static void setup_next(void)
{
    while (!stopping && setup_active < opt.conc && started < opt.sessions) {
        struct conn *c = &conns[started];
        int u = (int)started++;
        if (conn_start(c, u)) {
            c->in_setup = true;
            setup_active++;
        }
    }
}

static void conn_finish(struct conn *c, bool ok)
{
    if (c->fd >= 0)
        close(c->fd); /* also takes it out of the epoll set */
    c->fd = -1;
    c->st = S_FREE;
    c->gen++;
    active--;
    if (ok) {
        ok_sessions++;
        if (lat)
            lat[nlat++] = (now_s() - c->t0) * 1e3;
    }
    if (opt.mode == M_CHURN || opt.mode == M_LATENCY) {
        slot_next(c);
    } else if (opt.mode == M_IDLE && c->in_setup) {
        c->in_setup = false;
        setup_active--;
        setup_next();
    }
}

/* Send what is left of c->out; false if that ended the session. */
static bool flush_out(struct conn *c)
{
    while (c->ooff < c->olen) {
        ssize_t n = send(c->fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (n > 0) {
            c->ooff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            if (!c->want_out) {
                set_events(c, EPOLLIN | EPOLLOUT);
                c->want_out = true;
            }
            return true;
        } else {
            conn_fail(c, "send: %s", n < 0 ? strerror(errno) : "nothing sent");
            return false;
        }
    }
    c->olen = c->ooff = 0;
    if (c->want_out) {
        set_events(c, EPOLLIN);
        c->want_out = false;
    }
    return true;
}

/* Send "<a><b>\r\n" and wait for its reply in state st. */
static bool send_cmd(struct conn *c, enum state st, const char *a, const char *b)
{
    size_t la = strlen(a), lb = b ? strlen(b) : 0;
    memcpy(c->out, a, la);
    if (lb)
        memcpy(c->out + la, b, lb);
    memcpy(c->out + la + lb, "\r\n", 2);
    c->olen = la + lb + 2;
    c->ooff = 0;
    c->st = st;
    c->rp = R_STATUS;
    return flush_out(c);
}

static bool send_retr(struct conn *c)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, c->msgs[c->next].num);
    return send_cmd(c, S_RETR, "RETR ", num);
}

static bool send_quit(struct conn *c)
{
    return send_cmd(c, S_QUIT, "QUIT", NULL);
}

/*
 * A whole reply to c->st's command arrived (line: its status line, or NULL
 * after multi-line data): send the next command.  Returns false when the
 * session ended, so that the caller stops looking at c.
 */
static bool reply_done(struct conn *c, const char *line)
{
    const struct user *u = &users[c->user];
    switch (c->st) {
    case S_GREETING:
        return send_cmd(c, S_USER, "USER ", u->name);
    case S_USER:
        return send_cmd(c, S_PASS, "PASS ", u->pass);
    case S_PASS:
        return send_cmd(c, opt.mode == M_BULK ? S_LIST : S_STAT, opt.mode == M_BULK ? "LIST" : "STAT", NULL);
    case S_STAT:
        if (opt.mode == M_STAT) {
            stat_time = now_s();
            stat_cpu = cpu_s();
            if (sscanf(line, "+OK %" SCNu64 " %" SCNu64, &stat_count, &stat_size) != 2) {
                conn_fail(c, "bad STAT reply: %.200s", line);
                return false;
            }
            stat_seen = true;
        }
        if (opt.mode == M_IDLE) {
            c->st = S_IDLE; /* logged in: hold it */
            c->in_setup = false;
            setup_active--;
            logged_in++;
            setup_next();
            return true;
        }
        return send_quit(c);
    case S_LIST:
        c->next = 0;
        return c->nmsg ? send_retr(c) : send_quit(c);
    case S_RETR: {
        const struct msg *m = &c->msgs[c->next++];
        messages++;
        bytes += c->got;
        if (c->got != m->size) {
            mismatches++;
            if (mism_shown++ < MAX_SHOWN)
                fprintf(stderr, "loadgen: mismatch: user %s, message %" PRIu64 ": LIST said %" PRIu64
                        " octets, RETR gave %" PRIu64 "\n", u->name, m->num, m->size, c->got);
        }
        return c->next < c->nmsg ? send_retr(c) : send_quit(c);
    }
    case S_NOOP:
        if (c->quitting)
            return send_quit(c);
        c->st = S_IDLE;
        return true;
    case S_QUIT:
        if (opt.mode == M_BULK) {
            last_quit = now_s();
            last_quit_cpu = cpu_s();
        }
        if (opt.mode == M_IDLE)
            closed_ok++;
        /* Wait for the server to close: it unlocks the mailbox before that,
         * so the next session of this user cannot find it still in use. */
        c->st = S_CLOSING;
        return true;
    default:
        return true;
    }
}

/* One complete line (CRLF stripped) of a status reply or of LIST's data. */
static bool line_done(struct conn *c, const char *line, size_t len)
{
    if (c->rp == R_LISTDATA) {
        if (len == 1 && line[0] == '.') {
            c->rp = R_STATUS;
            return reply_done(c, NULL);
        }
        char *e1, *e2 = NULL;
        uint64_t num = strtoull(line, &e1, 10);
        uint64_t size = e1 > line && *e1 == ' ' ? strtoull(e1 + 1, &e2, 10) : 0;
        if (e1 == line || *e1 != ' ' || e2 == e1 + 1) {
            conn_fail(c, "bad LIST line: %.200s", line);
            return false;
        }
        if (c->nmsg == c->msgcap) {
            c->msgcap = c->msgcap ? 2 * c->msgcap : 64;
            c->msgs = realloc(c->msgs, c->msgcap * sizeof *c->msgs);
            if (!c->msgs)
                die(2, "out of memory");
        }
        c->msgs[c->nmsg++] = (struct msg){num, size};
        return true;
    }
    if (c->st == S_IDLE) {
        conn_fail(c, "unexpected line from the server: %.200s", line);
        return false;
    }
    if (len < 3 || memcmp(line, "+OK", 3) != 0 || (len > 3 && line[3] != ' ')) {
        conn_fail(c, "expected +OK, got: %.200s", line);
        return false;
    }
    if (c->st == S_LIST) {
        c->rp = R_LISTDATA;
        c->nmsg = 0;
        return true;
    }
    if (c->st == S_RETR) {
        c->rp = R_RETRDATA;
        c->ds = D_BOL;
        c->got = 0;
        return true;
    }
    return reply_done(c, line);
}

/*
 * Count RETR payload in [p, end) without buffering it: the state survives
 * any split between reads (inside a line, between '\r' and '\n', after a
 * leading '.').  A line starting with '.' loses that '.' (RFC 1939 byte
 * stuffing; a correct server only sends such lines as ".."), and ".\r\n"
 * ends the message.  Returns where the data ended (c->rp then becomes
 * R_STATUS) or end.
 */
static const char *retr_feed(struct conn *c, const char *p, const char *end)
{
    while (p < end) {
        switch (c->ds) {
        case D_BOL:
            if (*p == '.') {
                c->ds = D_DOT;
                p++;
            } else {
                c->ds = D_MID;
            }
            break;
        case D_DOT:
            if (*p == '\r') {
                c->ds = D_DOTCR;
                p++;
            } else {
                c->ds = D_MID; /* the stuffed '.' is dropped, the rest counts */
            }
            break;
        case D_DOTCR:
            if (*p == '\n') {
                c->rp = R_STATUS;
                return p + 1;
            }
            c->got++; /* ".\r" then more: a data line, its '\r' counts */
            c->ds = D_MID;
            break;
        case D_MID: {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            const char *stop = nl ? nl + 1 : end;
            c->got += (uint64_t)(stop - p);
            p = stop;
            if (nl)
                c->ds = D_BOL;
            break;
        }
        }
    }
    return end;
}

/* Feed received bytes to c's parser; stops as soon as the session ended. */
static void feed(struct conn *c, const char *p, size_t n)
{
    const char *end = p + n;
    while (p < end) {
        if (c->st == S_CLOSING)
            return; /* nothing after QUIT's reply matters */
        if (c->rp == R_RETRDATA) {
            p = retr_feed(c, p, end);
            if (c->rp == R_RETRDATA)
                return;
            if (!reply_done(c, NULL))
                return;
            continue;
        }
        /* Status and LIST lines: gather into c->line (a longer line is cut). */
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl + 1 : end;
        size_t take = (size_t)(stop - p), room = LINE_CAP - 1 - c->llen;
        memcpy(c->line + c->llen, p, take < room ? take : room);
        c->llen += take < room ? take : room;
        p = stop;
        if (!nl)
            return;
        size_t len = c->llen;
        while (len && (c->line[len - 1] == '\n' || c->line[len - 1] == '\r'))
            len--;
        c->line[len] = '\0';
        c->llen = 0;
        if (!line_done(c, c->line, len))
            return;
    }
}

static void on_readable(struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n > 0) {
            uint32_t gen = c->gen;
            feed(c, rbuf, (size_t)n);
            /* A short read means the socket is very likely drained; if not,
             * level-triggered epoll reports it again (saves an EAGAIN recv). */
            if (c->gen != gen || (size_t)n < sizeof rbuf)
                return;
        } else if (n == 0) {
            if (c->st == S_CLOSING)
                conn_finish(c, true);
            else
                conn_fail(c, "connection closed by the server%s", c->st == S_IDLE ? " while idle" : "");
            return;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            return;
        } else {
            if (c->st == S_CLOSING && errno == ECONNRESET)
                conn_finish(c, true); /* QUIT was answered: the session is complete */
            else
                conn_fail(c, "%s", strerror(errno));
            return;
        }
    }
}

static void on_stdin(void)
{
    char buf[4096];
    ssize_t n = read(0, buf, sizeof buf);
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR)))
        return; /* whatever the harness writes is ignored: only EOF counts */
    stdin_eof = true;
    epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
}

static void send_noops(void)
{
    for (long i = 0; i < nconns; i++)
        if (conns[i].st == S_IDLE)
            send_cmd(&conns[i], S_NOOP, "NOOP", NULL);
}

/* Run the event loop until done() or the deadline; false on the deadline. */
static bool loop(bool (*done)(void), double deadline)
{
    struct epoll_event evs[MAX_EVENTS];
    while (!done()) {
        double t = now_s();
        if (holding && t >= next_noop) {
            send_noops();
            next_noop += NOOP_INTERVAL;
            continue;
        }
        if (t >= deadline)
            return false;
        double wake = holding && next_noop < deadline ? next_noop : deadline;
        double ms = (wake - t) * 1e3 + 1;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, ms > 3.6e6 ? 3600000 : (int)ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(2, "epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == STDIN_TAG) {
                on_stdin();
                continue;
            }
            struct conn *c = &conns[(uint32_t)tag];
            if (c->gen != (uint32_t)(tag >> 32) || c->st == S_FREE)
                continue; /* the connection it was about is closed already */
            uint32_t ev = evs[i].events;
            if ((ev & EPOLLOUT) && c->want_out && !flush_out(c))
                continue;
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(c);
        }
    }
    return true;
}

static bool all_finished(void) { return active == 0 && started >= opt.sessions; }
static bool none_active(void) { return active == 0; }
static bool setup_finished(void) { return setup_active == 0 && started >= opt.sessions; }
static bool stdin_closed(void) { return stdin_eof; }

/* Time is up: every unfinished session (or, for idle's setup, every one not
 * yet logged in) is an error, and so is every session not started. */
static void abort_unfinished(const char *why, bool setup_only)
{
    stopping = true;
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->st != S_FREE && (!setup_only || c->in_setup))
            conn_fail(c, "%s", why);
    }
    if (started < opt.sessions && opt.mode != M_BULK && opt.mode != M_STAT) {
        fprintf(stderr, "loadgen: %s: %ld sessions not started\n", why, opt.sessions - started);
        errors += opt.sessions - started;
        started = opt.sessions;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentile p (0..1) of the sorted latencies, interpolated as numpy does; "null" if none. */
static const char *percentile(double p, char *buf, size_t size)
{
    if (nlat == 0)
        return "null";
    double pos = p * (double)(nlat - 1);
    long lo = (long)pos;
    double v = lat[lo];
    if (lo + 1 < nlat)
        v += (lat[lo + 1] - v) * (pos - (double)lo);
    snprintf(buf, size, "%.3f", v);
    return buf;
}

static void load_users(void)
{
    FILE *f = fopen(opt.users_path, "r");
    if (!f)
        die(2, "%s: %s", opt.users_path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, ucap = 0;
    long index = 0, lineno = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        char *sp = strchr(line, ' ');
        if (!sp || sp == line || !sp[1] || strchr(sp + 1, ' '))
            die(2, "%s line %ld: expected 'user password'", opt.users_path, lineno);
        *sp = '\0';
        if (strlen(line) > ARG_MAX_LEN || strlen(sp + 1) > ARG_MAX_LEN)
            die(2, "%s line %ld: name or password longer than %d", opt.users_path, lineno, ARG_MAX_LEN);
        if (index++ < opt.offset)
            continue;
        if ((size_t)nusers == ucap) {
            ucap = ucap ? 2 * ucap : 1024;
            users = realloc(users, ucap * sizeof *users);
            if (!users)
                die(2, "out of memory");
        }
        users[nusers].name = strdup(line);
        users[nusers].pass = strdup(sp + 1);
        if (!users[nusers].name || !users[nusers].pass)
            die(2, "out of memory");
        nusers++;
    }
    free(line);
    fclose(f);
    if (nusers == 0)
        die(2, "%s: no users from offset %ld (the file has %ld)", opt.users_path, opt.offset, index);
}

static void resolve(void)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res;
    int rc = getaddrinfo(opt.host, opt.port, &hints, &res);
    if (rc != 0)
        die(2, "%s port %s: %s", opt.host, opt.port, gai_strerror(rc));
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            fprintf(stderr, "loadgen: warning: cannot raise RLIMIT_NOFILE: %s\n", strerror(errno));
    }
}

static void usage(int status)
{
    fputs("usage: loadgen --host HOST --port PORT --mode churn|bulk|stat|idle|latency --users FILE\n"
          "               [--concurrency C] [--sessions N] [--user-offset K] [--timeout SECONDS]\n"
          "  churn    N sessions (USER/PASS/STAT/QUIT), C at once (default 50)\n"
          "  bulk     C sessions at once (default 1): LIST, RETR of every message, QUIT\n"
          "  stat     one session: time from connect to the STAT reply\n"
          "  idle     N sessions logged in and held until stdin's EOF, C set up at once (default 64)\n"
          "  latency  N sessions of churn form, one at a time\n"
          "--users: lines 'user password', taken from line K on; --sessions defaults to 1000,\n"
          "--timeout (default 120 s) bounds the measured phase.\n",
          status ? stderr : stdout);
    exit(status);
}

static long parse_long(const char *name, const char *s, long min)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < min)
        die(2, "%s: bad value '%s' (an integer, at least %ld)", name, s, min);
    return v;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i], *eq = strchr(name, '=');
        char key[32];
        const char *val;
        if (!strcmp(name, "--help") || !strcmp(name, "-h"))
            usage(0);
        if (strncmp(name, "--", 2) != 0)
            usage(2);
        if (eq) { /* --name=value */
            snprintf(key, sizeof key, "%.*s", (int)(eq - name), name);
            val = eq + 1;
        } else {
            snprintf(key, sizeof key, "%s", name);
            if (++i >= argc)
                die(2, "%s needs a value", name);
            val = argv[i];
        }
        if (!strcmp(key, "--host")) {
            opt.host = val;
        } else if (!strcmp(key, "--port")) {
            opt.port = val;
        } else if (!strcmp(key, "--users")) {
            opt.users_path = val;
        } else if (!strcmp(key, "--concurrency")) {
            opt.conc = parse_long(key, val, 1);
        } else if (!strcmp(key, "--sessions")) {
            opt.sessions = parse_long(key, val, 1);
        } else if (!strcmp(key, "--user-offset")) {
            opt.offset = parse_long(key, val, 0);
        } else if (!strcmp(key, "--timeout")) {
            char *e;
            opt.timeout = strtod(val, &e);
            if (e == val || *e || !(opt.timeout > 0))
                die(2, "--timeout: bad value '%s'", val);
        } else if (!strcmp(key, "--mode")) {
            opt.mode = M_NONE;
            for (int m = 0; m < 5; m++)
                if (!strcmp(val, mode_names[m]))
                    opt.mode = (enum mode)m;
            if (opt.mode == M_NONE)
                die(2, "--mode: unknown mode '%s'", val);
        } else {
            die(2, "unknown option %s", key);
        }
    }
    if (opt.mode == M_NONE || !opt.port || !opt.users_path)
        die(2, "--mode, --port and --users are required (--help for more)");
    if (opt.conc < 0)
        opt.conc = opt.mode == M_CHURN ? 50 : opt.mode == M_IDLE ? 64 : 1;
    if (opt.mode == M_LATENCY || opt.mode == M_STAT)
        opt.conc = 1;
    if (opt.mode == M_BULK || opt.mode == M_STAT)
        opt.sessions = opt.conc; /* one session per connection */
}

static void print_json(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("{\"mode\":\"%s\",", mode_names[opt.mode]);
    vprintf(fmt, ap);
    va_end(ap);
    fputs("}\n", stdout);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    load_users();
    if ((opt.mode == M_CHURN || opt.mode == M_BULK) && nusers < opt.conc)
        die(2, "%ld users from offset %ld, need at least --concurrency %ld", nusers, opt.offset, opt.conc);
    if (opt.mode == M_IDLE && nusers < opt.sessions)
        die(2, "%ld users from offset %ld, need at least --sessions %ld", nusers, opt.offset, opt.sessions);
    raise_nofile();
    resolve();
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die(2, "epoll_create1: %s", strerror(errno));

    /* churn, latency: one struct per slot, reused; bulk, idle: one per session. */
    nconns = opt.mode == M_IDLE ? opt.sessions : opt.conc < opt.sessions ? opt.conc : opt.sessions;
    conns = calloc((size_t)nconns, sizeof *conns);
    if (!conns)
        die(2, "out of memory");
    for (long i = 0; i < nconns; i++)
        conns[i].fd = -1;

    double t0 = now_s(), c0 = cpu_s(), t1, c1;
    bool timed_out = false;
    char b1[32], b2[32];

    switch (opt.mode) {
    case M_CHURN:
    case M_LATENCY:
        /* floor(M/C) users per slot: with M a multiple of C, exactly users
         * i, i+C, i+2C, ... modulo M; otherwise the last M mod C are unused. */
        slot_per = nusers / opt.conc;
        lat = malloc((size_t)opt.sessions * sizeof *lat);
        if (!lat)
            die(2, "out of memory");
        for (long i = 0; i < nconns; i++)
            slot_next(&conns[i]);
        if (!loop(all_finished, t0 + opt.timeout)) {
            timed_out = true;
            abort_unfinished("timed out", false);
        }
        t1 = now_s();
        c1 = cpu_s();
        qsort(lat, (size_t)nlat, sizeof *lat, cmp_double);
        print_json("\"sessions\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"cpu_seconds\":%.6f,"
                         "\"sessions_per_second\":%.1f,\"latency_ms_median\":%s,\"latency_ms_%s\":%s,\"timed_out\":%s",
                         ok_sessions, errors, t1 - t0, c1 - c0, t1 > t0 ? (double)ok_sessions / (t1 - t0) : 0.0,
                         percentile(0.5, b1, sizeof b1), opt.mode == M_CHURN ? "p99" : "p90",
                         percentile(opt.mode == M_CHURN ? 0.99 : 0.90, b2, sizeof b2), timed_out ? "true" : "false");
        break;

    case M_BULK:
        for (long i = 0; i < nconns; i++) {
            started++;
            conn_start(&conns[i], (int)i);
        }
        if (!loop(none_active, t0 + opt.timeout)) {
            timed_out = true;
            abort_unfinished("timed out", false);
        }
        t1 = last_quit > 0 ? last_quit : now_s();
        c1 = last_quit > 0 ? last_quit_cpu : cpu_s();
        print_json("\"sessions\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"cpu_seconds\":%.6f,\"messages\":%ld,"
                         "\"bytes\":%" PRIu64 ",\"mb_per_second\":%.3f,\"mismatches\":%ld,\"timed_out\":%s",
                         ok_sessions, errors, t1 - t0, c1 - c0, messages, bytes,
                         t1 > t0 ? (double)bytes / 1e6 / (t1 - t0) : 0.0, mismatches, timed_out ? "true" : "false");
        break;

    case M_STAT:
        started = 1;
        conn_start(&conns[0], 0);
        if (!loop(none_active, t0 + opt.timeout)) {
            timed_out = true;
            abort_unfinished("timed out", false);
        }
        t1 = stat_seen ? stat_time : now_s();
        c1 = stat_seen ? stat_cpu : cpu_s();
        print_json("\"sessions\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"cpu_seconds\":%.6f,\"count\":%" PRIu64
                         ",\"size\":%" PRIu64 ",\"timed_out\":%s",
                         ok_sessions, errors, t1 - t0, c1 - c0, stat_count, stat_size, timed_out ? "true" : "false");
        break;

    case M_IDLE: {
        setup_next();
        if (!loop(setup_finished, t0 + opt.timeout)) {
            timed_out = true;
            abort_unfinished("timed out before logging in", true);
        }
        t1 = now_s();
        c1 = cpu_s();
        print_json("\"ready\":true,\"sessions\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"cpu_seconds\":%.6f,"
                         "\"timed_out\":%s",
                         logged_in, errors, t1 - t0, c1 - c0, timed_out ? "true" : "false");

        /* Hold until stdin's EOF.  A stdin epoll cannot watch (a regular
         * file, /dev/null) is at EOF as soon as it is read to the end. */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0)
            stdin_eof = true;
        holding = true;
        next_noop = t0 + NOOP_INTERVAL;
        loop(stdin_closed, 1e300);
        holding = false;

        for (long i = 0; i < nconns; i++) {
            if (conns[i].st == S_IDLE)
                send_quit(&conns[i]);
            else if (conns[i].st == S_NOOP)
                conns[i].quitting = true;
        }
        if (!loop(none_active, now_s() + QUIT_WAIT))
            abort_unfinished("no reply to QUIT in time", false);
        print_json("\"closed\":%ld,\"errors\":%ld", closed_ok, errors);
        break;
    }
    case M_NONE:
        break;
    }

    if (shown < errors)
        fprintf(stderr, "loadgen: %ld errors in all (%ld shown)\n", errors, shown);
    if (mism_shown > MAX_SHOWN)
        fprintf(stderr, "loadgen: %ld mismatches in all (%d shown)\n", mismatches, MAX_SHOWN);
    return errors == 0 && mismatches == 0 ? 0 : 1;
}
