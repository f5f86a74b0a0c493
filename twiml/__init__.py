"""The TwiML documents the app serves (edit the .xml files here).

This folder is installed as the package `bot.twiml_documents` (see pyproject.toml), so an
installed bot finds them without a checkout; bot/twiml.py renders them.
"""
