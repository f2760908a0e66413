"""Closed-class words per language: the only word lists the guards use.

Each list is small and general: function words, fillers, negators, tense
markers, question words, number and month names. None names a product, an
action or anything else a support question is about; telling "cancel" from
"terminate" is the embedding's job (and a verifier's), not this module's.

Everything is stored folded (`fold`: case-folded, accents stripped from Latin
letters), the form the guards compare, so "qué" and "que", "Straße" and
"strasse" are one word, and as `tokens.tokenize` cuts it ("s'il" is "se il",
"d'accord" "de accord"). Languages: English, German, Spanish, French. A
question in another language is read with the English lists, which hold
next to none of its words: nearly every word in it is a content word and every
difference rejects, which is the safe direction.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache


@lru_cache(maxsize=65536)
def fold(word: str) -> str:
    """Case-folded, accents stripped from Latin letters: the form words are compared in.

    Only Latin: there an accent is often left out by whoever types ("suscripcion"),
    while in Cyrillic "й" is a letter of its own, not "и" with a mark.
    """
    w = word.casefold()
    if w.isascii():
        return w
    out: list[str] = []
    for c in unicodedata.normalize("NFD", w):
        if unicodedata.combining(c) and out and "a" <= out[-1] <= "z":
            continue
        out.append(c)
    return unicodedata.normalize("NFC", "".join(out))


def _words(text: str) -> frozenset[str]:
    return frozenset(fold(w) for w in text.split())


def _phrases(text: str) -> tuple[tuple[str, ...], ...]:
    """'not sure, thank you' -> (("not", "sure"), ("thank", "you")), longest first."""
    items = [p for p in (q.strip() for q in text.split(",")) if p]
    return tuple(sorted((tuple(fold(w) for w in p.split()) for p in items), key=len, reverse=True))


def _table(text: str, start: int = 1) -> dict[str, int]:
    """'a b|c d' -> a, b: start; c, d: start + 1 (synonyms share a value)."""
    out: dict[str, int] = {}
    for i, group in enumerate(text.split("|")):
        for w in group.split():
            out[fold(w)] = start + i
    return out


def _kinds(**groups: str) -> dict[tuple[str, ...], str]:
    """Question words and phrases -> the kind of answer they ask for."""
    out: dict[tuple[str, ...], str] = {}
    for kind, text in groups.items():
        for p in text.split(","):
            out[tuple(fold(w) for w in p.split())] = kind
    return out


@dataclass(frozen=True, slots=True)
class Lang:
    code: str
    stop: frozenset[str]  # function words: say nothing about what is asked
    filler: frozenset[str]  # greetings, thanks, politeness, interjections, hedges
    framing: frozenset[str]  # how a question is put, never what it asks ("need", "help", "way", "possible")
    light: frozenset[str]  # light verbs ("get", "use", "take"): count only when swapped for another
    negators: frozenset[str]
    filler_phrases: tuple[tuple[str, ...], ...]  # set phrases, dropped whole ("not sure", "thank you")
    splitters: frozenset[str]  # conjunctions that open a new clause
    past: frozenset[str]
    future: frozenset[str]
    anchors: dict[str, str]  # deictic days: yesterday -> "-1"
    qkinds: dict[tuple[str, ...], str]  # question words -> the kind of answer (time, reason, place...)
    anywhere: frozenset[tuple[str, ...]]  # question phrases that ask wherever they stand ("how many")
    # Prepositions that give the next words a role: "s" from, "d" to, "f" for, "i" instead of. A second
    # letter marks a weak one, which counts only in a clause that has both a source and a destination
    # ("from savings to checking"): "b" when bare (no article or pronoun after it: "to" before a verb is
    # "to do"), "w" always (Spanish and French "de" is mostly "of").
    roles: dict[str, str]
    role_phrases: tuple[tuple[tuple[str, ...], str], ...]  # the same, in several words ("instead of")
    numbers: dict[str, int]
    ordinals: dict[str, int]
    months: dict[str, int]
    weekdays: dict[str, int]
    time_after: frozenset[str]  # a word after a number that makes it a clock time ("Uhr")
    time_units: frozenset[str]  # "how many days" asks how long, like "how long"
    suffix4: frozenset[str]  # inflections a shared stem of 4+ letters may differ by
    suffix5: frozenset[str]  # inflections and derivations a shared stem of 5+ letters may differ by
    ask: frozenset[str] = frozenset()  # words after which a question word asks ("tell me when")
    proc_next: frozenset[str] = frozenset()  # "where do I ...": a procedure, not a place
    proc_person: frozenset[str] = frozenset()
    first_person: frozenset[str] = frozenset()  # I, me, my, we...: the asker
    first_object: frozenset[str] = frozenset()  # the forms a preposition takes: "for me", "für mich"
    # Modality, read where a question opens ("Can I...?" / "Must I...?", "Do I have to...?"): what the
    # asker may do against what they must. Not before "you" ("Can you help me...?" is a request).
    permission: frozenset[str] = frozenset()
    obligation: frozenset[str] = frozenset()
    obligation_pairs: frozenset[tuple[str, str]] = frozenset()  # "tengo que"; English "do I have to" in reading
    addressee: frozenset[str] = frozenset()
    framing_before: dict[str, str] = field(default_factory=dict)  # framing only before this word: "need to"
    marks: frozenset[str] = field(init=False)  # the words that say a text is in this language
    questions: tuple[tuple[tuple[str, ...], str], ...] = field(init=False)  # qkinds, longest phrase first
    question_starts: frozenset[str] = field(init=False)
    phrase_starts: dict[str, tuple[tuple[str, ...], ...]] = field(init=False)  # filler phrases by first word
    role_starts: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "marks", self.stop | self.filler | self.negators)
        object.__setattr__(self, "questions", tuple(sorted(self.qkinds.items(), key=lambda kv: -len(kv[0]))))
        object.__setattr__(self, "question_starts", frozenset(p[0] for p in self.qkinds))
        starts: dict[str, list[tuple[str, ...]]] = {}
        for p in self.filler_phrases:  # already longest first
            starts.setdefault(p[0], []).append(p)
        object.__setattr__(self, "phrase_starts", {w: tuple(ps) for w, ps in starts.items()})
        roles: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for p, k in self.role_phrases:
            roles.setdefault(p[0], []).append((p, k))
        object.__setattr__(self, "role_starts", {w: tuple(ps) for w, ps in roles.items()})


EN = Lang(
    code="en",
    stop=_words(
        """
        a an the this that these those i me my mine myself we us our ours ourselves you your yours yourself
        yourselves he him his himself she her hers herself it its itself they them their theirs themselves
        what which who whom whose when where why how whats am is are was were be been being do does did doing
        done have has had having will would shall should can could may might must ought of in on at by for with
        about to from into onto than as like via per and or but nor so because if unless while whereas although
        though whether then also too very just only even still already yet again really quite rather much
        many some any there here now such own anyone anybody someone somebody everyone everybody
        regarding im ive youre theyre thats theres wheres hows whos
        """
    ),
    filler=_words(
        """
        hi hello hey hiya dear greetings thanks thank thx ty please pls plz kindly ok okay hmm hm um umm uh uhh
        er erm ah oh yes yeah yep sorry excuse wondering wonder hope hoping question questions
        btw fyi asap regards cheers anyway anyhow basically actually literally honestly seriously apparently
        hopefully unfortunately guys folks
        """
    ),
    framing=_words(
        """
        want wants wanted wanting need needs needed needing like likes liked try tries tried trying help helps
        helped helping know knows knew known tell tells told let lets way ways thing things something anything
        everything stuff process steps step able possible kind sort problem problems issue issues trouble other
        another different else gonna wanna wish grateful appreciate
        """
    ),
    light=_words(
        """
        get gets got gotten getting make makes made making go goes going went gone take takes took taken taking
        use uses used using see sees saw seen look looks looked looking find finds found put puts putting
        """
    ),
    negators=_words(
        """
        not no never without cannot unable nor neither none nothing nobody nowhere dont doesnt didnt cant
        wont isnt arent wasnt werent havent hasnt hadnt couldnt shouldnt wouldnt aint
        """
    ),
    filler_phrases=_phrases(
        """
        quick question, not sure, no idea, or not, whether or not, no problem, no worries, not only,
        thank you, no rush, if possible, if you can, good morning, good afternoon, good evening, in advance,
        sorry to bother you, hope all is well, hope you are well, have a nice day, have a good day,
        in order to, i would be grateful if, i would appreciate it if, i mean,
        quick one, silly question, just checking, thanks a lot, thanks a bunch, thanks a million,
        thank you so much, hi team, hello team, hi all, hello all, hi everyone, hello everyone,
        having a good day, having a great day, hope you are doing well, have a great day
        """
    ),
    splitters=_words("and but or because although though while whereas unless so then"),
    past=_words(
        """
        did was were had ago last yesterday previous previously earlier went came sent paid bought made took
        gave saw lost forgot found left told said spent sold broke chose wrote ran began became brought thought
        knew felt heard meant met won
        """
    ),
    future=_words("will shall tomorrow next upcoming gonna soon"),
    anchors={"yesterday": "-1", "today": "0", "tonight": "0n", "tomorrow": "+1"},
    qkinds=_kinds(
        time="when,how long,how soon,what time,what date,which day",
        reason="why,how come",
        person="who,whom,whose",
        place="where",
        quantity="how many,how much",
        frequency="how often",
    ),
    anywhere=frozenset({("how", "long"), ("how", "soon"), ("how", "many"), ("how", "much"), ("how", "often")}),
    roles={"from": "s", "to": "db", "into": "d", "onto": "d", "for": "f"},
    role_phrases=((("instead", "of"), "i"), (("rather", "than"), "i")),
    numbers={
        **_table("zero"),
        **{
            w: i + 2
            for i, w in enumerate(
                "two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                "seventeen eighteen nineteen twenty".split()
            )
        },
        "thirty": 30,
        "forty": 40,
        "fifty": 50,
        "sixty": 60,
        "seventy": 70,
        "eighty": 80,
        "ninety": 90,
        "hundred": 100,
        "thousand": 1000,
        "million": 1000000,
        "dozen": 12,
    },
    ordinals=_table("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"),
    months=_table(
        "january jan|february feb|march|april apr|may|june jun|july jul|august aug|september sep sept|"
        "october oct|november nov|december dec"
    ),
    weekdays=_table("monday|tuesday tue tues|wednesday|thursday thu thurs|friday fri|saturday|sunday"),
    time_after=_words("am pm oclock"),
    time_units=_words("seconds minutes hours days weeks months years"),
    suffix4=_words("s es ed d ing"),
    suffix5=_words("s es ed d ing e y ies ied er ers ly al ation ations ion ions ment ments able"),
    ask=_words("know tell me wondering wonder ask asking sure idea explain"),
    proc_next=_words("do can could should would must may"),
    proc_person=_words("i we"),
    first_person=_words("i me my mine myself we us our ours ourselves"),
    permission=_words("can could may might"),
    obligation=_words("must should"),
    addressee=_words("you u"),
    framing_before={"need": "to", "needs": "to", "needed": "to", "needing": "to"},  # "do I need a visa" asks
    first_object=_words("me myself us ourselves"),
)

DE = Lang(
    code="de",
    stop=_words(
        """
        der die das den dem des ein eine einen einem einer eines ich mich mir mein meine meinen meinem meiner
        meines du dich dir dein deine deinen deinem deiner er ihn ihm sein seine seinen seinem seiner sie ihr
        ihre ihren ihrem ihrer ihnen es wir uns unser unsere unseren unserem unserer euch euer eure man sich
        wer wen wem wessen was wann wo wohin woher wie warum wieso weshalb welche welcher welches welchen
        welchem bin bist ist sind seid sein gewesen habe hast hat haben habt kann kannst können könnt konnte
        könnte könnten muss musst müssen soll sollte sollten will willst wollen möchte möchten darf dürfen mag
        würde würden würdest dürfte dürften
        zu zum zur von vom mit bei beim für auf an am im in ins um über durch gegen seit bis nach und oder aber
        sondern denn doch weil wenn falls ob dass als so auch noch schon nur ja sehr dann da hier dort etwas
        dies diese dieser dieses diesen diesem jetzt gerade einfach gibt
        """
    ),
    filler=_words(
        """
        hallo hi hey servus moin liebe lieber geehrte geehrter damen herren danke dank vielen bitte ok okay
        hmm äh ähm also na nun gruß grüße mfg lg frage kurze eigentlich halt mal übrigens leider
        """
    ),
    framing=_words(
        """
        brauche brauchst braucht brauchen benötige benötigt helfen hilf hilfe weiß wissen sagen möglichkeit
        möglich weg art schritte sache problem probleme andere anderen anderer anderes bitten bitte
        """
    ),
    light=_words(
        """
        machen mache machst macht gemacht bekomme bekommst bekommt bekommen kriege kriegen gehen geht finden
        finde findet nehmen nehme nimmt benutzen benutze nutzen sehen sehe sieht
        """
    ),
    negators=_words(
        "nicht nie niemals nichts niemand nirgends ohne weder kein keine keinen keinem keiner keines nimmer"
    ),
    filler_phrases=_phrases(
        """
        keine ahnung, kein problem, oder nicht, nicht sicher, guten morgen, guten tag, guten abend,
        vielen dank, sehr geehrte damen und herren, sag mal, sagt mal, im voraus, einen schönen tag,
        hallo zusammen, hallo ihr lieben, viele grüße, liebe grüße, beste grüße, kurze frage,
        sorry für die störung, entschuldigung für die störung, entschuldigen sie die störung,
        entschuldigen sie die frage, ich hätte mal eine frage, ich hätte eine frage, tausend dank
        """
    ),
    splitters=_words("und oder aber sondern denn weil obwohl wenn falls als bevor nachdem während dass doch"),
    past=_words(
        """
        war waren warst wart hatte hatten hattest wurde wurden gestern vorgestern letzte letzten letzter letztes
        letztem vorige vorigen voriger vergangene vergangenen vergangener damals vorhin neulich
        """
    ),
    future=_words(
        "werde wirst wird werden werdet morgen übermorgen nächste nächsten nächster nächstes nächstem künftig bald"
    ),
    anchors={"gestern": "-1", "vorgestern": "-2", "heute": "0", "morgen": "+1", "ubermorgen": "+2"},
    qkinds=_kinds(
        time="wann,wie lange,wie bald,um wie viel uhr",
        reason="warum,wieso,weshalb,weswegen",
        person="wer,wem,wen,wessen",
        place="wo,wohin",
        quantity="wie viel,wieviel,wie viele,wieviele",
        frequency="wie oft",
    ),
    anywhere=frozenset(
        {("wie", "lange"), ("wie", "viel"), ("wieviel",), ("wie", "viele"), ("wieviele",), ("wie", "oft")}
    ),
    roles={
        **dict.fromkeys(["von", "vom", "aus"], "s"),
        **dict.fromkeys(["nach", "zum", "zur"], "d"),
        **dict.fromkeys(["zu", "auf"], "db"),
        **dict.fromkeys(["fur", "gegen"], "f"),
        **dict.fromkeys(["statt", "anstatt", "anstelle"], "i"),
    },
    role_phrases=(),
    numbers={
        **_table("null"),
        "eins": 1,
        **{fold(w): i + 2 for i, w in enumerate("zwei drei vier fünf sechs sieben acht neun zehn elf zwölf".split())},
        "zwanzig": 20,
        "dreissig": 30,
        "vierzig": 40,
        "funfzig": 50,
        "hundert": 100,
        "tausend": 1000,
    },
    ordinals=_table(
        "erste erster erstes ersten erstem|zweite zweiter zweites zweiten zweitem|dritte dritter drittes dritten|"
        "vierte vierter viertes vierten|fünfte fünfter fünftes fünften"
    ),
    months=_table("januar jänner|februar|märz|april|mai|juni|juli|august|september|oktober|november|dezember"),
    weekdays=_table("montag|dienstag|mittwoch|donnerstag|freitag|samstag sonnabend|sonntag"),
    time_after=_words("uhr"),
    time_units=_words("sekunden minuten stunden tage wochen monate jahre"),
    suffix4=_words("e en er es n s t et te ten st"),
    suffix5=_words("e en er es n s t et te ten st ung ungen lich ig heit keit"),
    ask=_words("wissen sagen frage fragen"),
    proc_next=_words("kann muss soll könnte sollte"),
    proc_person=_words("ich wir"),
    first_person=_words("ich mich mir mein meine meinen meinem meiner meines wir uns unser unsere unseren unserem"),
    permission=_words("kann kannst können könnt könnte könnten darf darfst dürfen dürfte"),
    obligation=_words("muss musst müssen müsste soll sollst sollen sollte sollten"),
    addressee=_words("sie du ihr"),
    first_object=_words("mich mir uns"),
)

ES = Lang(
    code="es",
    stop=_words(
        """
        el la los las lo un una unos unas al del yo me mi mis mío mía tú tu tus te ti usted ustedes su sus
        nosotros nosotras nos nuestro nuestra nuestros nuestras él ella ellos ellas le les se que qué cual cuál
        cuales cuáles quien quién quienes como cómo cuando cuándo donde dónde adonde por porque para de a en con
        sobre entre hasta desde hacia según y e o u pero sino si es son soy eres somos está están estoy estás
        estamos ser estar era fue hay ha he has han hemos haber había puedo puede puedes pueden podemos podría
        poder debo debe debería quiero quieres quiere quisiera tengo tiene tienen tener muy también ya todavía
        aún solo sólo este esta esto estos estas ese esa eso esos esas aquí ahí allí mucho tan así
        """
    ),
    filler=_words(
        """
        hola buenas buenos gracias favor porfa saludos oye eh hmm ok vale bueno pues entonces perdón perdona
        perdone disculpa disculpe pregunta consulta mira
        """
    ),
    framing=_words(
        """
        necesito necesita necesitan necesitamos ayudar ayuda ayudarme ayúdame saber sé decir forma manera modo
        paso pasos proceso posible cosa algo problema otro otra otros otras gustaría desearía agradecería
        ruego
        """
    ),
    light=_words(
        """
        hacer hago hace hacen hecho obtener conseguir ver veo encontrar encuentro usar uso tomar tomo
        """
    ),
    negators=_words("no nunca jamás sin ni nada nadie ningún ninguno ninguna tampoco"),
    filler_phrases=_phrases(
        """
        no sé, ni idea, o no, no hay problema, buenos días, buenas tardes, buenas noches, por favor,
        muchas gracias, pues nada, una duda, una pregunta, de antemano,
        mil gracias, una cosita, una pregunta rápida, hola buenas, perdonad la molestia,
        perdone la molestia, disculpe la molestia, disculpa la molestia, perdón por la molestia
        """
    ),
    splitters=_words("y e o u pero sino porque aunque si cuando mientras"),
    past=_words(
        """
        ayer anoche anteayer pasado pasada pasados pasadas fue fui fueron era eran estaba estaban hubo había
        tuve tuvo hice hizo
        """
    ),
    future=_words("mañana próximo próxima próximos próximas será serán habrá tendré tendrá pronto"),
    anchors={"ayer": "-1", "anteayer": "-2", "anoche": "-1n", "hoy": "0", "manana": "+1"},
    qkinds=_kinds(
        time="cuándo,cuánto tiempo,a qué hora",
        reason="por qué,porqué",
        person="quién,quiénes",
        place="dónde,adónde",
        quantity="cuánto,cuánta,cuántos,cuántas",
        frequency="con qué frecuencia,cada cuánto",
    ),
    anywhere=frozenset({("cuanto", "tiempo"), ("cuantos",), ("cuantas",)}),
    roles={
        **dict.fromkeys(["de", "del"], "sw"),
        **dict.fromkeys(["desde"], "s"),
        **dict.fromkeys(["al", "hacia"], "d"),
        **dict.fromkeys(["a"], "db"),
        **dict.fromkeys(["por", "para"], "f"),
    },
    role_phrases=((("en", "lugar", "de"), "i"), (("en", "vez", "de"), "i")),
    numbers={
        **_table("cero"),
        **{fold(w): i + 2 for i, w in enumerate("dos tres cuatro cinco seis siete ocho nueve diez once doce".split())},
        "veinte": 20,
        "treinta": 30,
        "cuarenta": 40,
        "cincuenta": 50,
        "cien": 100,
        "mil": 1000,
    },
    ordinals=_table("primero primera primer|segundo segunda|tercero tercera tercer|quinto quinta"),
    months=_table("enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre setiembre|octubre|noviembre|diciembre"),
    weekdays=_table("lunes|martes|miércoles|jueves|viernes|sábado|domingo"),
    time_after=frozenset(),
    time_units=_words("segundos minutos horas días semanas meses años"),
    suffix4=_words("s es a o as os"),
    suffix5=_words(
        "s es a o as os ar er ir ado ada ados adas ido ida idos idas ando iendo acion aciones cion ciones "
        "mente e an en amos o"
    ),
    ask=_words("saber decir sabe pregunto"),
    proc_next=_words("puedo podemos debo debemos tengo tenemos hay se"),
    first_person=_words("yo me mi mis mí mío mía conmigo nosotros nosotras nos nuestro nuestra nuestros nuestras"),
    permission=_words("puedo puede puedes pueden podemos podría podrían"),
    obligation=_words("debo debe debes deben debemos debería"),
    obligation_pairs=frozenset({("tengo", "que"), ("tenemos", "que"), ("hay", "que")}),
    addressee=_words("usted ustedes tú"),
    first_object=_words("mí nosotros nosotras"),
)

FR = Lang(
    code="fr",
    stop=_words(
        """
        le la les l un une des du de d au aux ce cet cette ces c ça cela ceci je j me m moi mon ma mes tu te t
        toi ton ta tes il elle ils elles lui leur leurs se s son sa ses nous notre nos vous votre vos on y en
        qui que qu quoi quel quelle quels quelles lequel laquelle comment quand où pourquoi combien est es suis
        sont sommes êtes être était avoir ai as a avons avez ont avait peux peut pouvez pouvons puis pourrais
        pourrait dois doit devez veux veut voulez voudrais voudrait faut et ou mais donc or car si à dans sur
        pour par avec chez vers entre depuis pendant très aussi déjà encore toujours seulement juste bien là
        ici pourriez pourrions
        """
    ),
    filler=_words(
        """
        bonjour bonsoir salut coucou merci svp stp plaît cordialement madame monsieur euh hmm bon ben bah ok
        alors bref voilà question petite excusez désolé désolée pardon
        """
    ),
    framing=_words(
        """
        besoin aider aide aidez savoir sais dire dites dis façon manière moyen étapes étape processus procédure
        possible chose quelque problème autre autres souhaite souhaiterais souhaiterait souhaitons veuillez
        """
    ),
    light=_words(
        """
        faire fais fait faites obtenir voir vois trouver trouve utiliser utilise prendre prends
        """
    ),
    negators=_words("ne n pas jamais sans aucun aucune rien ni guère nul nulle"),
    filler_phrases=_phrases(
        """
        je ne sais pas, je sais pas, pas sûr, pas sûre, ou pas, ou non, pas de problème,
        se il vous plaît, se il te plaît, de accord, je vous prie de, bien vouloir, par avance,
        de avance, merci beaucoup, mille mercis, alors voilà, bonne journée, petite question,
        désolé de vous déranger, désolée de vous déranger, excusez moi de vous déranger
        """
    ),
    splitters=_words("et ou mais car donc puisque quand lorsque si parce"),
    past=_words(
        """
        hier avant-hier dernier dernière derniers dernières passé passée passés passées était étaient étais
        avait avaient fut été
        """
    ),
    future=_words(
        "demain après-demain prochain prochaine prochains prochaines sera seront serai seras aura auront ira "
        "iront bientôt"
    ),
    anchors={"hier": "-1", "avanthier": "-2", "aujourdhui": "0", "demain": "+1", "apresdemain": "+2"},
    qkinds=_kinds(
        time="quand,combien de temps,à quelle heure",
        reason="pourquoi",
        person="qui",
        place="où",
        quantity="combien",
        frequency="à quelle fréquence,tous les combien",
    ),
    anywhere=frozenset({("combien", "de", "temps")}),
    roles={
        **dict.fromkeys(["de", "du", "des"], "sw"),
        **dict.fromkeys(["depuis"], "s"),
        **dict.fromkeys(["au", "aux", "vers"], "d"),
        **dict.fromkeys(["a"], "db"),
        **dict.fromkeys(["pour", "contre"], "f"),
    },
    role_phrases=((("au", "lieu", "de"), "i"), (("plutot", "que"), "i")),
    numbers={
        **_table("zéro"),
        **{fold(w): i + 2 for i, w in enumerate("deux trois quatre cinq six sept huit neuf dix onze douze".split())},
        "vingt": 20,
        "trente": 30,
        "quarante": 40,
        "cinquante": 50,
        "cent": 100,
        "mille": 1000,
    },
    ordinals=_table("premier première|deuxième second seconde|troisième|quatrième|cinquième"),
    months=_table("janvier|février|mars|avril|mai|juin|juillet|août|septembre|octobre|novembre|décembre"),
    weekdays=_table("lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche"),
    time_after=_words("h"),
    time_units=_words("secondes minutes heures jours semaines mois ans années"),
    suffix4=_words("s e es x"),
    suffix5=_words("s e es x er ez ee ees ent ant ation ations ment ements ement ait aient ons"),
    ask=_words("savoir dire demande"),
    proc_next=_words("puis peux dois pouvons devons faut"),
    first_person=_words("je me moi mon ma mes nous notre nos"),
    permission=_words("peux peut pouvez pouvons puis pourrais pourrait"),
    obligation=_words("dois doit devez devons devrais devrait faut"),
    addressee=_words("vous tu"),
    first_object=_words("moi nous"),
)

LANGS: tuple[Lang, ...] = (EN, DE, ES, FR)
BY_CODE = {lang.code: lang for lang in LANGS}

# Currencies and percent, in any language: a symbol, code or name -> one unit.
UNITS: dict[str, str] = {
    **dict.fromkeys(["$", "usd", "dollar", "dollars", "us$"], "usd"),
    **dict.fromkeys(["€", "eur", "euro", "euros"], "eur"),
    **dict.fromkeys(["£", "gbp"], "gbp"),
    **dict.fromkeys(["¥", "jpy", "yen"], "jpy"),
    **dict.fromkeys(["₹", "inr", "rupee", "rupees"], "inr"),
    **{code: code for code in ("chf", "cad", "aud")},
    **dict.fromkeys(["%", "percent", "prozent", "pourcent"], "pct"),
}

# Which languages use a word as a function word or negator (weight 2) or a filler (weight 1, weaker
# evidence: "um" is a German preposition and an English "um"): one look-up a word to detect.
MARKS: dict[str, tuple[tuple[int, int], ...]] = {}
for _i, _lang in enumerate(LANGS):
    for _w in _lang.marks:
        _weight = 2 if _w in _lang.stop or _w in _lang.negators else 1
        MARKS[_w] = (*MARKS.get(_w, ()), (_i, _weight))
del _i, _lang, _w, _weight

# Words used across the four languages to decide whether a hyphenated word is
# one word ("e-mail", "two-factor") or a phrase ("sign-in", "puis-je").
ANY_STOP: frozenset[str] = frozenset().union(*(lang.stop for lang in LANGS))
