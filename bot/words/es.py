"""Spanish: neutral Latin American Spanish, with "usted" for callers (what stores use on the phone)."""

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
Eres el asistente telefónico de una tienda. Estás hablando por una línea telefónica.
- Sé breve y natural: una o dos frases cortas por turno, y luego deja hablar a quien llama.
- Usa search_products para encontrar lo que pide quien llama. Menciona como mucho tres
  productos, por su nombre y su precio en palabras (por ejemplo "cuatrocientos once dólares"),
  con un motivo cada uno.
- Nunca leas en voz alta SKU, enlaces, direcciones web, JSON ni números largos. Eso va en el texto.
- Ofrece enviar los detalles por mensaje de texto. Cuando acepte, llama a send_product_details
  con los SKU de los productos de los que hablaron y di que el mensaje va en camino. Si el
  resultado dice que no se puede enviar, díselo; nunca prometas un mensaje que no se envió.
- Si una herramienta informa de un error, dilo con sencillez y ofrece una alternativa.
- Si quien llama pide hablar con una persona, o no puedes ayudar, llama a transfer_to_person.
- Cuando se despida o tenga lo que necesita, despídete en una frase corta y llama a end_call.
- Trata a quien llama de usted.
""",
    browser="""\
Eres el asistente de una tienda, en la página web de la tienda. El cliente te habla por su
micrófono y te oye por sus altavoces, o escribe; ve una pantalla.
- Sé breve y natural: una o dos frases cortas por turno, y luego deja hablar al cliente.
- Usa search_products para encontrar lo que pide el cliente. Menciona como mucho tres productos,
  por su nombre y su precio en palabras (por ejemplo "cuatrocientos once dólares"), con un
  motivo cada uno.
- Nunca leas en voz alta SKU, enlaces, direcciones web, JSON ni números largos. Eso está en la pantalla.
- Siempre que menciones productos, llama a show_products con sus SKU para que el cliente los vea
  como tarjetas (fotos, precios, preguntas y respuestas, vistas 3D y RA, video, ficha técnica),
  y di que están en la pantalla.
- Si una herramienta informa de un error, dilo con sencillez y ofrece una alternativa.
""",
    store_intro="La tienda es {store}.",
    store_notes="Sobre esta tienda:\n{notes}",
    greet="Saluda a quien llama en una frase corta como asistente de la tienda y pregúntale qué busca.",
    greet_with='Saluda a quien llama con estas palabras, y nada más: "{greeting}"',
    speak_only_this="- Habla siempre en español.",
    speak_callers_language="- Habla el idioma de quien llama; si no se sabe, en español.",
)

TOOLS = ToolWords(
    search=(
        "Busca en el catálogo de la tienda. Devuelve hasta cinco resultados con nombre, marca, "
        "precio con descuento, valoración y un resumen de una línea para decir, y el sku de cada "
        "producto para {skus_for}. Nunca leas el sku en voz alta."
    ),
    search_skus_for_phone="send_product_details",
    search_skus_for_browser="show_products",
    query_phone="Lo que quiere quien llama, con sus palabras.",
    query_browser="Lo que quiere el cliente, con sus palabras.",
    max_price="Precio máximo con descuento, en dólares.",
    brand="Solo esta marca.",
    min_rating="Valoración mínima de los clientes, de 0 a 5.",
    send=(
        "Envía a quien llama por mensaje de texto los detalles de estos productos (fotos, vistas "
        "3D y RA, video, ficha técnica) y envíalos al centro de atención de la tienda. Usa los "
        "sku de search_products. El resultado dice si el mensaje va en camino."
    ),
    note="Una nota corta para incluir, opcional.",
    language="El idioma que habla quien llama, para escribir el mensaje en ese idioma.",
    transfer="Pasa la llamada a una persona de la tienda. Antes, di que la estás pasando.",
    reason="Por qué, en pocas palabras.",
    end_call="Cuelga después de despedirte.",
    show=(
        "Muestra estos productos al cliente como tarjetas en su pantalla: fotos, precio, "
        "descuento, valoración, descripción, preguntas y respuestas, y enlaces a la vista 3D, la "
        "vista RA, el video y la ficha técnica. Usa los sku de search_products."
    ),
)

RESULTS = ResultWords(
    best_match="Lo mejor: {mentions}.",
    best_matches="Lo mejor: {mentions}.",
    last_joiner="y {mention}",
    mention="{name}, {price}, {reason}",
    by_brand="{name} de {brand}",
    rated="con {rate} de 5 en valoración",
    no_such_brand="La tienda no tiene ninguna marca llamada {brand}. Tiene, entre otras, {brands}.",
    under_price="por menos de {price}",
    from_brand="de {brand}",
    rated_at_least="con una valoración de {rating} o más",
    limits_joiner=" y ",
    nothing_matches="No hay nada en la tienda que coincida. Pídele que lo describa de otra manera.",
    nothing_matches_limits="No hay nada {limits}.",
    closest_without_limits="No hay nada {limits}. Sin esos límites, lo más parecido es {mention}.",
    not_stored="Dile a quien llama que ahora mismo no se pudo enviar el mensaje{offer}",
    texting_off=(
        "Esta tienda no envía mensajes de texto, así que no prometas ninguno. El equipo de la "
        "tienda tiene los detalles{offer}"
    ),
    hidden_number=(
        "El número de quien llama está oculto, así que no se le puede enviar un mensaje; díselo. "
        "El equipo de la tienda tiene los detalles{offer}"
    ),
    text_on_its_way="Dile a quien llama que los detalles van en camino por mensaje de texto.",
    text_sent="Dile a quien llama que ya se le envió el mensaje con los detalles.",
    text_failed=(
        "No se pudo enviar el mensaje: {reason}. Dile a quien llama que no se pudo enviar un "
        "mensaje a ese número. El equipo de la tienda tiene los detalles{offer}"
    ),
    refusals={
        21211: "el número no es un móvil válido",
        21408: "los mensajes a ese país no están habilitados",
        21610: "ese número pidió no recibir mensajes de la tienda",
        21612: "ese número no puede recibir mensajes de la tienda",
        21614: "el número es un teléfono fijo",
    },
    refusal_default="el mensaje no se pudo entregar",
    offer_person="; ofrece pasarle con una persona de la tienda.",
    offer_describe="; ofrece describirle los productos brevemente.",
    transferring="Di en una frase corta que le estás pasando con una persona ahora.",
    nobody_available=(
        "Ahora mismo nadie de la tienda puede atender la llamada. Discúlpate brevemente y {offer}"
    ),
    store_closed=(
        "La tienda está cerrada ahora, así que nadie puede atender la llamada. {when} Discúlpate "
        "brevemente y {offer}"
    ),
    offer_text_or_help="ofrece enviarle los detalles de los productos por mensaje, o sigue ayudándole tú.",
    offer_help="ofrece seguir ayudándole tú.",
    shown=(
        "Los productos ya están en la pantalla del cliente. Dilo en pocas palabras; nunca leas "
        "sus detalles ni sus enlaces."
    ),
    shown_some_unknown=" Algunos sku no están en el catálogo y no se muestran.",
)

LINES = LineWords(
    right_now="Ahora mismo: {line}",
    transfer=(
        "Dile a quien llama en una frase corta que le estás pasando ahora con una persona de la "
        "tienda. No llames a ninguna herramienta."
    ),
    goodbye="Despídete con amabilidad en una frase corta. No llames a ninguna herramienta.",
    resume=(
        "La línea se cortó un momento. Discúlpate en pocas palabras y sigue la conversación "
        "donde se quedó."
    ),
    transfer_cancelled_note=(
        "Quien llama habló antes de que se pasara la llamada, así que no se pasó. Pregúntale si "
        "todavía quiere hablar con una persona."
    ),
    transfer_failed_note="No se pudo pasar la llamada a una persona; quien llama sigue hablando contigo.",
    transfer_failed=(
        "Dile a quien llama que ahora mismo no se le pudo pasar con una persona, y ofrécete a "
        "ayudarle tú. No llames a ninguna herramienta."
    ),
    end_cancelled_note="Quien llama habló durante la despedida, así que la llamada sigue. Escúchale.",
    still_there=(
        "Quien llama lleva un rato en silencio. Pregúntale en pocas palabras si sigue ahí. No "
        "llames a ninguna herramienta."
    ),
    idle_goodbye=(
        "Quien llama no contesta. Di en una frase corta que vas a terminar la llamada porque no "
        "le oyes, y despídete. No llames a ninguna herramienta."
    ),
    one_moment=(
        'Una herramienta que llamaste sigue trabajando. Di solo esto: "{words}" No digas nada '
        "de su resultado y no llames a ninguna herramienta."
    ),
    one_moment_words="Un momento, por favor, ya casi está.",
)

SMS = SmsWords(
    details="Estos son los detalles de los productos de los que hablamos.",
    shown="Estos son los productos de los que estamos hablando.",
    photo="Foto",
    view_3d="Vista 3D",
    view_ar="Vista RA",
    video="Video",
    specs="Ficha técnica",
    percent_off="{price}, {discount}% de descuento",
)

HOURS = HoursWords(
    days=("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    closed_day="cerrado",
    span="de {start} a {end}",
    schedule="Horario: {days}.",
    open_now="La tienda está abierta ahora, hasta las {time} de hoy.",
    closed_now="La tienda está cerrada ahora; vuelve a abrir el {day} a las {time}.",
    closed_until_unknown="La tienda está cerrada ahora.",
    after_hours_transfer=(
        "Cuando la tienda está cerrada, a quien quiere hablar con una persona se le pasa a su "
        "línea de fuera de horario."
    ),
    no_transfer_after_hours=(
        "Cuando la tienda está cerrada nadie puede atender una llamada: ofrece enviar los "
        "detalles por mensaje, o ayuda tú a quien llama."
    ),
)

WORDS = Words(
    code="es",
    name="español",
    agent=AGENT,
    tools=TOOLS,
    results=RESULTS,
    lines=LINES,
    sms=SMS,
    hours=HOURS,
)
