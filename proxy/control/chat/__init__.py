"""Chat commands: ``/flag …`` from a Slack slash command and a Telegram bot (docs/chatops.md).

commands.py   the grammar: text → a ``Command`` or a ``Usage`` error (pure)
executor.py   a command applied through the same store changes as the admin API, and announced
runtime.py    what the chat endpoints keep: seen signatures and update ids, the background poster
slack.py      POST /chat/slack     (signed slash commands; ephemeral replies, response_url)
telegram.py   POST /chat/telegram  (Bot API webhook; replies with sendMessage)
"""
