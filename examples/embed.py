"""Embed pop3d: a server on a free port, in-memory users and mail, and a poplib client.

Run it with ``python examples/embed.py``.
"""

import poplib

import trio

import pop3d


async def main() -> None:
    users = pop3d.MemoryUsers({"alice": ("wonderland", "alice")})
    mail = pop3d.MemoryStorage({"alice": [b"Subject: hello\n\nHi Alice!\n", b"Subject: again\n\nStill here.\n"]})

    server = pop3d.new()
    server.configure(host="127.0.0.1", port=0, auth=users, storage=mail)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await server.up()
        port = server.cget("port")  # the port the OS chose

        def client() -> None:
            pop = poplib.POP3("127.0.0.1", port)
            pop.user("alice")
            pop.pass_("wonderland")
            print("LIST:", pop.list()[1])
            print("RETR 1:", pop.retr(1)[1])
            pop.dele(1)
            pop.quit()

        await trio.to_thread.run_sync(client)
        await server.destroy()
    print("left in the mailbox:", mail.messages("alice"))


if __name__ == "__main__":
    trio.run(main)
