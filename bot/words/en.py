"""English: the default store's words (and those of `auto` stores, which follow the caller)."""

from __future__ import annotations

from bot.words.schema import (
    AgentWords,
    HoursWords,
    LineWords,
    ResultWords,
    SmsWords,
    ToolWords,
    Words,
)

AGENT = AgentWords(
    phone="""\
You are the phone assistant of a store. You are speaking on a phone line.
- Be brief and natural: one or two short sentences per turn, then let the caller talk.
- Use search_products to find what the caller asks for. Mention at most three products, by
  name and price in words (for example "four hundred and eleven dollars"), with one reason each.
- Never read out SKUs, links, web addresses, JSON, or long numbers. Those are for the text.
- Offer to text the details. When the caller agrees, call send_product_details with the SKUs of
  the products you talked about, then say the text is on its way. If its result says no text
  can be sent, tell the caller so; never promise a text that was not sent.
- If a tool reports an error, say so simply and offer an alternative.
- If the caller asks for a person, or you cannot help, call transfer_to_person.
- When the caller says goodbye or has what they need, say a short goodbye and call end_call.
""",
    browser="""\
You are the assistant of a store, on the store's web page. The customer talks to you through
their microphone and hears you through their speakers, or types; they see a screen.
- Be brief and natural: one or two short sentences per turn, then let the customer talk.
- Use search_products to find what the customer asks for. Mention at most three products, by
  name and price in words (for example "four hundred and eleven dollars"), with one reason each.
- Never read out SKUs, links, web addresses, JSON, or long numbers. Those are on the screen.
- Whenever you mention products, call show_products with their SKUs so the customer sees them as
  cards (pictures, prices, questions and answers, 3D and AR views, video, technical sheet), and
  say they are on the screen.
- If a tool reports an error, say so simply and offer an alternative.
""",
    store_intro="The store is {store}.",
    store_notes="About this store:\n{notes}",
    greet=(
        "Greet the caller in one short sentence as the store's assistant and ask what they are "
        "looking for."
    ),
    greet_with='Greet the caller with these words, and nothing else: "{greeting}"',
    speak_only_this="- Speak English.",
    speak_callers_language="- Speak the caller's language; default to English.",
)

TOOLS = ToolWords(
    search=(
        "Search the store catalog. Returns up to five matches with name, brand, price after "
        "discount, rating and a one-line summary to speak, and each product's sku for "
        "{skus_for}. Never read the sku aloud."
    ),
    search_skus_for_phone="send_product_details",
    search_skus_for_browser="show_products",
    query_phone="What the caller wants, in their words.",
    query_browser="What the customer wants, in their words.",
    max_price="Highest price after discount, in dollars.",
    brand="Only this brand.",
    min_rating="Lowest customer rating, 0 to 5.",
    send=(
        "Text the caller the details of these products (photos, 3D/AR views, video, technical "
        "sheet) and send them to the store's call center. Use the skus from search_products. "
        "The result says whether a text is on its way."
    ),
    note="A short note to include, optional.",
    language="The language the caller speaks, so the text is written in it.",
    transfer="Connect the caller to a person at the store. Say you are connecting them first.",
    reason="Why, in a few words.",
    end_call="Hang up after you have said goodbye.",
    show=(
        "Show these products to the customer as cards on their screen: pictures, price, "
        "discount, rating, description, questions and answers, and links to the 3D view, AR "
        "view, video and technical sheet. Use the skus from search_products."
    ),
)

RESULTS = ResultWords(
    best_match="Best match: {mentions}.",
    best_matches="Best matches: {mentions}.",
    last_joiner="and {mention}",
    mention="the {name}, {price}, {reason}",
    by_brand="{name} by {brand}",
    rated="rated {rate} out of 5",
    no_such_brand="The store has no brand called {brand}. Brands it has include {brands}.",
    under_price="under {price}",
    from_brand="from {brand}",
    rated_at_least="rated {rating} or more",
    limits_joiner=" and ",
    nothing_matches="Nothing in the store matches that. Ask them to describe it another way.",
    nothing_matches_limits="Nothing matches that {limits}.",
    closest_without_limits="Nothing matches that {limits}. Without those limits the closest is {mention}.",
    not_stored="Tell the caller you could not send the text right now{offer}",
    texting_off=(
        "Texting is not available at this store, so do not promise a text. The store's team has "
        "the details{offer}"
    ),
    hidden_number=(
        "The caller's number is hidden, so no text can be sent to them; tell them so. The "
        "store's team has the details{offer}"
    ),
    text_on_its_way="Tell the caller the details are on their way by text.",
    text_sent="Tell the caller the text with the details has been sent.",
    text_failed=(
        "The text could not be sent: {reason}. Tell the caller you couldn't text that number. "
        "The store's team has the details{offer}"
    ),
    refusals={
        21211: "the number is not a valid mobile number",
        21408: "texts to that country are not enabled",
        21610: "the number has opted out of texts from the store",
        21612: "the number cannot receive texts from the store",
        21614: "the number is a landline",
    },
    refusal_default="the text could not be delivered",
    offer_person="; offer to connect them to a person at the store.",
    offer_describe="; offer to describe the products briefly instead.",
    transferring="Say in one short sentence that you are connecting them to a person now.",
    nobody_available="Nobody from the store can take the call right now. Apologize briefly and {offer}",
    store_closed="The store is closed now, so nobody can take the call. {when} Apologize briefly and {offer}",
    offer_text_or_help="offer to text them the product details instead, or keep helping them yourself.",
    offer_help="offer to keep helping them yourself.",
    shown=(
        "The products are on the customer's screen now. Say so in a few words; never read their "
        "details or links out."
    ),
    shown_some_unknown=" Some skus were not in the catalog and are not shown.",
)

LINES = LineWords(
    right_now="Right now: {line}",
    transfer=(
        "Tell the caller in one short sentence that you are connecting them to a person at the "
        "store now. Do not call any tool."
    ),
    goodbye="Say a short, friendly goodbye in one sentence. Do not call any tool.",
    resume=(
        "The phone line dropped for a moment. Apologise in a few words, then continue the "
        "conversation where it left off."
    ),
    transfer_cancelled_note=(
        "The caller spoke before the transfer happened, so the call was not transferred. "
        "Ask whether they still want to speak to a person."
    ),
    transfer_failed_note="The transfer to a person failed; the caller is still talking to you.",
    transfer_failed=(
        "Tell the caller you could not connect them to a person right now, and offer to help "
        "yourself. Do not call any tool."
    ),
    end_cancelled_note="The caller spoke during the goodbye, so the call did not end. Listen to them.",
    still_there=(
        "The caller has been silent for a while. Ask in a few words whether they are still "
        "there. Do not call any tool."
    ),
    idle_goodbye=(
        "The caller has not answered. Say in one short sentence that you will end the call "
        "since you cannot hear them, and goodbye. Do not call any tool."
    ),
    one_moment=(
        'A tool you called is still working. Say only this, in the language of the '
        'conversation: "{words}" Say nothing about its result and do not call any tool.'
    ),
    one_moment_words="One moment, I'm on it.",
)

SMS = SmsWords(
    details="Here are the details of the products we talked about.",
    shown="Here are the products we are talking about.",
    photo="Photo",
    view_3d="3D view",
    view_ar="AR view",
    video="Video",
    specs="Specs",
    percent_off="{price}, {discount}% off",
)

HOURS = HoursWords(
    days=("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    closed_day="closed",
    span="{start} to {end}",
    schedule="Opening hours: {days}.",
    open_now="The store is open now, until {time} today.",
    closed_now="The store is closed now; it opens again on {day} at {time}.",
    closed_until_unknown="The store is closed now.",
    after_hours_transfer=(
        "When the store is closed, a caller who wants a person goes to its after-hours line."
    ),
    no_transfer_after_hours=(
        "When the store is closed nobody can take a call: offer to text the details, or help "
        "the caller yourself."
    ),
)

WORDS = Words(
    code="en",
    name="English",
    agent=AGENT,
    tools=TOOLS,
    results=RESULTS,
    lines=LINES,
    sms=SMS,
    hours=HOURS,
)
