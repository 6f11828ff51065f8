"""Synthetic private phone-assistant interactions, one persona per phone.

Each simulated user has their own contacts, places, routines, tastes and phrasing, in English or
Chinese. The assistant's replies resolve the user's shorthand ("text mom", "take me home") to that
user's own details, so a personal adapter has something real to learn that no other phone shares,
while the reply formats are common to all phones (what the global adapter learns).
Deterministic: the same (seed, user) always gives the same persona and interactions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Message = dict[str, str]
Conversation = list[Message]

_EN_NAMES = ["Linda", "Sam", "Priya", "Marco", "Aisha", "Tom", "Elena", "Kenji", "Grace", "Omar",
             "Lucy", "Diego", "Hannah", "Ravi", "Sophie", "Jonas", "Mei", "Carlos", "Nora", "Ben"]
_ZH_NAMES = ["王丽", "李强", "张伟", "刘洋", "陈静", "杨帆", "赵敏", "黄磊", "周婷", "吴昊",
             "徐静", "孙悦", "马超", "朱琳", "胡军", "郭欣", "何平", "高飞", "林涛", "罗兰"]
_EN_RELATIONS = ["mom", "dad", "boss", "partner", "sister", "brother", "best friend", "coach"]
_ZH_RELATIONS = ["妈妈", "爸爸", "老板", "老婆", "姐姐", "哥哥", "好朋友", "教练"]
_EN_STREETS = ["Oak Street", "Maple Avenue", "Harbor Road", "Elm Lane", "Cedar Court",
               "Riverside Drive", "Hillview Road", "Station Square"]
_ZH_STREETS = ["海淀区中关村大街", "朝阳区望京街", "浦东新区世纪大道", "天河区体育西路",
               "南山区科技园路", "西湖区文三路", "武侯区人民南路", "鼓楼区中山路"]
_EN_WORK = ["the Riverside Office Park", "St. Mary's Hospital", "Northgate Campus",
            "the Central Library", "Harbor Logistics Center", "the City Design Studio"]
_ZH_WORK = ["中关村软件园", "协和医院", "清华科技园", "市图书馆", "望京SOHO", "张江高科园区"]
_ARTISTS = [("Taylor Swift", "pop"), ("Miles Davis", "jazz"), ("Coldplay", "rock"),
            ("Beethoven", "classical"), ("Daft Punk", "electronic"), ("Adele", "soul")]
_ZH_ARTISTS = [("周杰伦", "流行"), ("邓紫棋", "流行"), ("五月天", "摇滚"), ("久石让", "古典"),
               ("陈奕迅", "流行"), ("李健", "民谣")]
_DEVICES = [("living room lights", "lights"), ("bedroom air conditioner", "ac"),
            ("kitchen lights", "lights"), ("study heater", "heater")]
_ZH_DEVICES = [("客厅灯", "lights"), ("卧室空调", "ac"), ("厨房灯", "lights"), ("书房暖气", "heater")]
_EN_NOTES = ["I'm on my way", "running ten minutes late", "see you at dinner",
             "call me when you're free", "I picked up the groceries"]
_ZH_NOTES = ["我在路上了", "我要晚到十分钟", "晚饭见", "有空给我回电话", "菜我已经买好了"]
_EN_TASKS = ["pay the electricity bill", "pick up the dry cleaning", "book a dentist appointment",
             "water the plants", "renew the car insurance"]
_ZH_TASKS = ["交电费", "取干洗的衣服", "预约牙医", "给花浇水", "续交车险"]
_EN_FACTS = [("What's the capital of France?", "The capital of France is Paris."),
             ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
             ("What's the boiling point of water?", "Water boils at 100 °C at sea level."),
             ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.")]
_ZH_FACTS = [("法国的首都是哪里？", "法国的首都是巴黎。"), ("一小时有多少分钟？", "一小时有60分钟。"),
             ("水的沸点是多少？", "在海平面上，水的沸点是100摄氏度。"),
             ("《静夜思》是谁写的？", "《静夜思》是唐代诗人李白写的。")]
_INTENTS = ["alarm", "message", "call", "navigate", "music", "reminder", "home", "fact"]


@dataclass(frozen=True)
class Persona:
    """One phone owner's private world."""

    lang: str                      # "en" | "zh"
    contacts: tuple[tuple[str, str], ...]   # (relation, name)
    home: str
    work: str
    wake: str                      # "HH:MM"
    artist: tuple[str, str]        # (artist, genre)
    device: tuple[str, str]        # (device name, kind)
    setpoint: int                  # preferred temperature, deg C
    style: int                     # 0 polite, 1 terse, 2 casual
    intent_weights: tuple[float, ...]


def make_persona(rng: random.Random, lang: str) -> Persona:
    """Draw one persona; `rng` is the user's own generator."""
    zh = lang == "zh"
    relations = rng.sample(_ZH_RELATIONS if zh else _EN_RELATIONS, 3)
    names = rng.sample(_ZH_NAMES if zh else _EN_NAMES, 3)
    number = rng.randint(3, 188)
    street = rng.choice(_ZH_STREETS if zh else _EN_STREETS)
    return Persona(
        lang=lang,
        contacts=tuple(zip(relations, names, strict=False)),
        home=f"{street}{number}号" if zh else f"{number} {street}",
        work=rng.choice(_ZH_WORK if zh else _EN_WORK),
        wake=f"{rng.randint(5, 8)}:{rng.choice(['00', '15', '30', '45'])}",
        artist=rng.choice(_ZH_ARTISTS if zh else _ARTISTS),
        device=rng.choice(_ZH_DEVICES if zh else _DEVICES),
        setpoint=rng.randint(19, 26),
        style=rng.randrange(3),
        intent_weights=tuple(rng.uniform(0.2, 1.0) for _ in _INTENTS),
    )


def _en(p: Persona, intent: str, rng: random.Random) -> tuple[str, str]:
    ask = ["Could you please {}?", "{}", "hey, {}"][p.style]
    relation, name = rng.choice(p.contacts)
    if intent == "alarm":
        return ask.format("wake me up at the usual time"), f"Alarm set for {p.wake} tomorrow, as usual."
    if intent == "message":
        note = rng.choice(_EN_NOTES)
        return (ask.format(f"text my {relation} that {note}"),
                f"Sending to {name} ({relation}): \"{note.capitalize()}.\"")
    if intent == "call":
        return ask.format(f"call my {relation}"), f"Calling {name} ({relation}) now."
    if intent == "navigate":
        home = rng.random() < 0.5
        dest, label = (p.home, "home") if home else (p.work, "work")
        return (ask.format(f"take me {label}" if home else "navigate to work"),
                f"Starting navigation to {dest} ({label}).")
    if intent == "music":
        artist, genre = p.artist
        return ask.format("play my usual music"), f"Playing your {genre} mix: {artist}."
    if intent == "reminder":
        task = rng.choice(_EN_TASKS)
        return (ask.format(f"remind me to {task} when I get home"),
                f"OK, I'll remind you to {task} when you arrive at {p.home}.")
    if intent == "home":
        device, kind = p.device
        action = f"set to {p.setpoint} °C" if kind in ("ac", "heater") else "turned on"
        return ask.format(f"turn on the {device}"), f"The {device} is {action}."
    question, answer = rng.choice(_EN_FACTS)
    return question, answer


def _zh(p: Persona, intent: str, rng: random.Random) -> tuple[str, str]:
    ask = ["请帮我{}，谢谢。", "{}", "嘿，{}"][p.style]
    relation, name = rng.choice(p.contacts)
    if intent == "alarm":
        return ask.format("按平时的时间叫我起床"), f"已为你设置明天{p.wake}的闹钟，和平时一样。"
    if intent == "message":
        note = rng.choice(_ZH_NOTES)
        return ask.format(f"给我{relation}发消息说{note}"), f"正在发送给{name}（{relation}）：“{note}。”"
    if intent == "call":
        return ask.format(f"打电话给我{relation}"), f"正在呼叫{name}（{relation}）。"
    if intent == "navigate":
        home = rng.random() < 0.5
        dest, label = (p.home, "家") if home else (p.work, "公司")
        return ask.format(f"导航回{label}" if home else "导航去公司"), f"开始导航到{dest}（{label}）。"
    if intent == "music":
        artist, genre = p.artist
        return ask.format("放我常听的歌"), f"正在播放你的{genre}歌单：{artist}。"
    if intent == "reminder":
        task = rng.choice(_ZH_TASKS)
        return ask.format(f"到家后提醒我{task}"), f"好的，你到达{p.home}时我会提醒你{task}。"
    if intent == "home":
        device, kind = p.device
        action = f"已调到{p.setpoint}度" if kind in ("ac", "heater") else "已打开"
        return ask.format(f"打开{device}"), f"{device}{action}。"
    question, answer = rng.choice(_ZH_FACTS)
    return question, answer


def user_conversations(*, seed: int, user: int, count: int, zh_fraction: float) -> list[Conversation]:
    """`count` interactions of one user, deterministic by (seed, user)."""
    rng = random.Random(f"fedmilm-synthetic:{seed}:{user}")
    lang = "zh" if rng.random() < zh_fraction else "en"
    persona = make_persona(rng, lang)
    write = _zh if lang == "zh" else _en
    conversations = []
    for _ in range(count):
        intent = rng.choices(_INTENTS, weights=persona.intent_weights)[0]
        question, answer = write(persona, intent, rng)
        conversations.append([{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}])
    return conversations
