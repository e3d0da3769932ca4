"""address: Chinese shipping messages in, the recipient as a seven-field JSON object out (information extraction).

    python examples/address/generate.py    # rewrites train.jsonl (2,000), test.jsonl (200), valid.jsonl (100)

The output is the same on every run (seeded, standard library only, no downloads). The evaluator can import
`score(prediction, reference) -> dict` (`eval.scorer: examples.address.generate:score`): exact match of the
whole object and accuracy per field.

Records are `{"input": message, "output": answer}`; test and valid records also carry "tags" (how the message
was written, see below), which training ignores.

The answer, compact JSON (ensure_ascii=False, separators "," and ":"), keys always in this order:
  name      the recipient as written: a surname (54 single, 4 double) and a given name of one or two characters
  phone     the mobile number normalised to its 11 digits: no spaces, dashes, brackets or +86/86 prefix
  province  the full official name: 浙江省, 广西壮族自治区; for the four municipalities 北京市 上海市 天津市 重庆市
  city      the full name: 杭州市; for a municipality the same as the province (上海市 / 上海市)
  district  as in the table: 西湖区, 浦东新区, 昆山市 (a county-level city), 管城回族区
  street    the road: a stem, an optional direction and a suffix (中山北路, 学府大道, 桂花巷, 人民街)
  detail    everything after the road: the house number, then maybe an estate or a tower with building,
            unit, floor and room (188号, 88号锦绣花园3栋2单元501室, 12号世纪大厦15楼1503)
e.g. {"name":"王芳","phone":"13812345678","province":"浙江省","city":"杭州市","district":"西湖区",
      "street":"文化路","detail":"188号锦绣花园3栋2单元501室"}

How the address is written (the model must complete province and city):
  province  full (浙江省, 35%), short (浙江, 30%), licence-plate abbreviation (浙, 10%; only for the 21 provinces
            whose abbreviation people write: 京 沪 津 渝 粤 浙 苏 鲁 川 鄂 湘 闽 皖 豫 冀 陕 辽 赣 桂 晋 琼), or left
            out (25%): the city alone decides the province, so "杭州西湖区..." → 浙江省
  city      full (杭州市, 60%) or without 市 (杭州, 40%); "浙江杭州" → 浙江省 / 杭州市
            (a province without a written abbreviation shares its 10% out among the other three forms)
  municipality  one name for both: 上海市 (40%), 上海 (30%), 沪 (15%), or twice as shop forms write it (上海 上海市)
  the parts province-city, district, street, detail always in that order, joined with nothing (70%) or spaces
How the message is written:
  labelled or bare fields (55%): name, phone and address in any of the six orders, all labelled or none
            (收件人/收货人/姓名/联系人, 电话/手机/手机号/联系电话/Tel, 地址/收货地址/详细地址/收件地址; colon ：
            or : or a space), separated by ，,；; / | a space or a newline, with an optional greeting before
            (您好，亲，老板，【收件信息】...) and a remark after (，谢谢 / ，尽快发货 ...);
  sentences (45%): 14 templates ("麻烦寄到{address}，{name}收，电话{phone}", "{name}（{phone}）{address}", ...).
  phone     13812345678 (40%), 138 1234 5678, 138-1234-5678, +86 13812345678, +8613812345678,
            +86-138-1234-5678, (+86) 138 1234 5678, 86-13812345678.
Cities are drawn uniformly (the four municipalities are 4 of the 52). The table below has 31 provinces, 52 cities
and 212 districts (public facts, written for this example); 1,440 street names (60 stems x 6 x 4).

What "held out" means (test and valid): what decides the answer is new. Their names, phone numbers and details
never occur in training nor twice among test+valid; their streets come from a fifth of all street names (288),
set aside by the seed before training is drawn; one district of every city with four or more (the last in the
table, 37 districts) never occurs in training, so about a sixth of held-out messages name a city-district pair
training never showed (tag "new_district"). Every city and every province occurs in training. No input is
shared. Since details must be new, the short ones (a house number alone) are a little rarer in held-out records
(20% of them against 26% in training).

valid.jsonl is for watching accuracy during training (`data.eval_file`); config.yaml, the README's block, does not
set it. Lengths (the chat template and the system prompt included; the answer with its end-of-turn token): under
SmolLM2's tokenizer a median of 218 tokens an example (max 289), answers 92 (max 123, under eval's default
max_new_tokens of 128); under Gemma 3's 133 (max 163), answers 61 (max 73).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # `python examples/address/generate.py` from anywhere
from tunesmith.atomic import write_text

FIELDS = ("name", "phone", "province", "city", "district", "street", "detail")
TRAIN_SIZE = 2000
TEST_SIZE = 200
VALID_SIZE = 100
SEED = 2000


@dataclass(frozen=True)
class Province:
    name: str
    """The full official name: the answer's province."""
    short: str
    abbr: str | None
    """The licence-plate abbreviation, where people write it in addresses."""
    cities: dict[str, tuple[str, ...]]
    """City (full name) → its districts. A municipality has one city named like itself."""

    @property
    def municipality(self) -> bool:
        return list(self.cities) == [self.name]


def _p(name: str, short: str, abbr: str | None, cities: dict[str, str]) -> Province:
    return Province(name, short, abbr, {city: tuple(districts.split()) for city, districts in cities.items()})


PROVINCES: tuple[Province, ...] = (
    _p("北京市", "北京", "京", {"北京市": "东城区 西城区 朝阳区 海淀区 丰台区 昌平区 通州区"}),
    _p("上海市", "上海", "沪", {"上海市": "黄浦区 徐汇区 长宁区 静安区 浦东新区 闵行区 杨浦区"}),
    _p("天津市", "天津", "津", {"天津市": "和平区 河西区 南开区 滨海新区 西青区"}),
    _p("重庆市", "重庆", "渝", {"重庆市": "渝中区 江北区 沙坪坝区 九龙坡区 南岸区 渝北区"}),
    _p("广东省", "广东", "粤", {"广州市": "天河区 越秀区 海珠区 白云区 番禺区",
                              "深圳市": "南山区 福田区 罗湖区 宝安区 龙岗区",
                              "佛山市": "禅城区 南海区 顺德区", "珠海市": "香洲区 斗门区 金湾区"}),
    _p("浙江省", "浙江", "浙", {"杭州市": "西湖区 上城区 拱墅区 滨江区 余杭区 萧山区",
                              "宁波市": "海曙区 江北区 鄞州区 北仑区", "温州市": "鹿城区 龙湾区 瓯海区",
                              "嘉兴市": "南湖区 秀洲区 海宁市"}),
    _p("江苏省", "江苏", "苏", {"南京市": "玄武区 秦淮区 鼓楼区 建邺区 江宁区",
                              "苏州市": "姑苏区 吴中区 相城区 昆山市 常熟市", "无锡市": "梁溪区 滨湖区 锡山区 江阴市"}),
    _p("山东省", "山东", "鲁", {"济南市": "历下区 市中区 槐荫区 天桥区", "青岛市": "市南区 市北区 崂山区 黄岛区 李沧区",
                              "烟台市": "芝罘区 莱山区 福山区"}),
    _p("四川省", "四川", "川", {"成都市": "锦江区 青羊区 金牛区 武侯区 成华区", "绵阳市": "涪城区 游仙区"}),
    _p("湖北省", "湖北", "鄂", {"武汉市": "江岸区 江汉区 武昌区 洪山区 汉阳区", "宜昌市": "西陵区 伍家岗区 夷陵区"}),
    _p("湖南省", "湖南", "湘", {"长沙市": "芙蓉区 天心区 岳麓区 开福区 雨花区", "株洲市": "天元区 芦淞区 荷塘区"}),
    _p("福建省", "福建", "闽", {"福州市": "鼓楼区 台江区 仓山区 晋安区", "厦门市": "思明区 湖里区 集美区 海沧区",
                              "泉州市": "鲤城区 丰泽区 晋江市"}),
    _p("安徽省", "安徽", "皖", {"合肥市": "蜀山区 庐阳区 包河区 瑶海区", "芜湖市": "镜湖区 弋江区 鸠江区"}),
    _p("河南省", "河南", "豫", {"郑州市": "金水区 二七区 中原区 管城回族区", "洛阳市": "西工区 老城区 涧西区 洛龙区"}),
    _p("河北省", "河北", "冀", {"石家庄市": "长安区 桥西区 新华区 裕华区", "唐山市": "路南区 路北区 丰润区"}),
    _p("陕西省", "陕西", "陕", {"西安市": "雁塔区 碑林区 莲湖区 新城区 未央区"}),
    _p("辽宁省", "辽宁", "辽", {"沈阳市": "和平区 沈河区 皇姑区 铁西区 浑南区", "大连市": "中山区 西岗区 沙河口区 甘井子区"}),
    _p("江西省", "江西", "赣", {"南昌市": "东湖区 西湖区 青山湖区 红谷滩区"}),
    _p("广西壮族自治区", "广西", "桂", {"南宁市": "青秀区 兴宁区 西乡塘区 江南区", "桂林市": "秀峰区 象山区 七星区"}),
    _p("山西省", "山西", "晋", {"太原市": "小店区 迎泽区 杏花岭区 万柏林区"}),
    _p("海南省", "海南", "琼", {"海口市": "龙华区 美兰区 秀英区 琼山区", "三亚市": "吉阳区 天涯区 海棠区"}),
    _p("云南省", "云南", None, {"昆明市": "五华区 盘龙区 官渡区 西山区"}),
    _p("黑龙江省", "黑龙江", None, {"哈尔滨市": "道里区 南岗区 道外区 香坊区"}),
    _p("吉林省", "吉林", None, {"长春市": "朝阳区 南关区 宽城区 绿园区"}),
    _p("贵州省", "贵州", None, {"贵阳市": "南明区 云岩区 观山湖区 花溪区"}),
    _p("甘肃省", "甘肃", None, {"兰州市": "城关区 七里河区 安宁区 西固区"}),
    _p("内蒙古自治区", "内蒙古", None, {"呼和浩特市": "新城区 回民区 玉泉区 赛罕区"}),
    _p("新疆维吾尔自治区", "新疆", None, {"乌鲁木齐市": "天山区 沙依巴克区 水磨沟区 新市区"}),
    _p("宁夏回族自治区", "宁夏", None, {"银川市": "兴庆区 金凤区 西夏区"}),
    _p("青海省", "青海", None, {"西宁市": "城东区 城中区 城西区 城北区"}),
    _p("西藏自治区", "西藏", None, {"拉萨市": "城关区 堆龙德庆区"}),
)
CITIES: dict[str, Province] = {city: province for province in PROVINCES for city in province.cities}
HELD_OUT_DISTRICTS: frozenset[tuple[str, str]] = frozenset(
    (city, districts[-1]) for province in PROVINCES for city, districts in province.cities.items()
    if len(districts) >= 4)
"""(city, district) pairs only test and valid messages name: the last district of every city with four or more."""

def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


SURNAMES = (*"王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔",
            "欧阳", "司马", "诸葛", "上官")
GIVEN = tuple("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建文辉玲晨宇浩然子涵欣怡梓轩雨萱思远佳琪嘉俊"
             "博雅晓峰海燕春梅志鹏丹一鸣诗琴")
MOBILE_PREFIXES = _words("130 131 132 133 134 135 136 137 138 139 145 147 150 151 152 153 155 156 157 158 159 166 "
                   "170 173 175 176 177 178 180 181 182 183 184 185 186 187 188 189 191 198 199")
ROAD_STEMS = _words("中山 解放 人民 建设 新华 文化 和平 长江 黄河 青年 光明 胜利 友谊 东风 迎宾 学院 科技 创业 金桥 银河 凤凰 "
              "翠竹 桂花 梅林 松柏 海棠 枫林 望江 滨河 沿江 学府 书院 锦绣 星光 育才 振兴 工农 团结 幸福 红旗 五一 "
              "八一 前进 体育 公园 府前 环城 工业 商业 健康 百花 丽水 清泉 北辰 紫阳 天目 龙井 江南 太白 长庆")
ROAD_DIRECTIONS = ("", "东", "西", "南", "北", "中")
ROAD_SUFFIXES = ("路", "街", "大道", "巷")
ESTATE_STEMS = _words("阳光 金色 碧水 翠苑 东方 世纪 金地 和谐 春晓 明珠 御景 香樟 紫荆 银杏 梧桐 玉兰 湖畔 清水湾 蓝天 嘉园")
ESTATE_SUFFIXES = ("花园", "小区", "家园", "新村", "公寓", "华庭")
TOWER_STEMS = _words("世纪 国际 金融 环球 时代 财富 华贸 创新 数码 万达")
TOWER_SUFFIXES = ("大厦", "中心", "广场")


def _all_streets() -> list[str]:
    return [stem + direction + suffix for stem in ROAD_STEMS for direction in ROAD_DIRECTIONS
            for suffix in ROAD_SUFFIXES]


def _street_split(seed: int = SEED) -> tuple[list[str], list[str]]:
    """(training streets, held-out streets): a fifth of all street names, chosen by the seed, kept for test/valid."""
    streets = _all_streets()
    random.Random(seed).shuffle(streets)
    cut = len(streets) // 5
    return sorted(streets[cut:]), sorted(streets[:cut])


# ---------------------------------------------------------------------------------------------- one recipient

def answer(fields: dict[str, str]) -> str:
    """The expected answer: the seven fields as compact JSON in FIELDS order."""
    return json.dumps({key: fields[key] for key in FIELDS}, ensure_ascii=False, separators=(",", ":"))


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def sample_recipient(rng: random.Random, streets: list[str], held_out: bool) -> dict[str, str]:
    """One recipient: the answer's seven fields. Training never draws a held-out district."""
    city = rng.choice(sorted(CITIES))
    province = CITIES[city]
    districts = [d for d in province.cities[city] if held_out or (city, d) not in HELD_OUT_DISTRICTS]
    given = "".join(rng.choice(GIVEN) for _ in range(1 if rng.random() < 0.35 else 2))
    return {
        "name": rng.choice(SURNAMES) + given,
        "phone": rng.choice(MOBILE_PREFIXES) + "".join(rng.choice("0123456789") for _ in range(8)),
        "province": province.name,
        "city": city,
        "district": rng.choice(districts),
        "street": rng.choice(streets),
        "detail": _detail(rng),
    }


def _detail(rng: random.Random) -> str:
    number = f"{rng.randint(1, 999)}号"
    kind = _weighted(rng, {"number": 0.25, "estate": 0.5, "tower": 0.25})
    if kind == "number":
        return number
    if kind == "tower":
        tower = rng.choice(TOWER_STEMS) + rng.choice(TOWER_SUFFIXES)
        floor = rng.randint(2, 40)
        room = f"{floor}{rng.randint(1, 30):02d}"
        return number + tower + rng.choice([f"{floor}楼", f"{floor}层{room}室", f"{room}室", f"{floor}楼{room}"])
    estate = rng.choice(ESTATE_STEMS) + rng.choice(ESTATE_SUFFIXES)
    building = str(rng.randint(1, 30)) + rng.choice(["栋", "幢", "号楼"])
    unit = f"{rng.randint(1, 6)}单元" if rng.random() < 0.5 else ""
    room = f"{rng.randint(1, 33)}{rng.randint(1, 4):02d}"
    return number + estate + building + unit + room + ("室" if rng.random() < 0.6 else "")


# ------------------------------------------------------------------------------------------- how it is written

LABELS = {"name": ("收件人", "收货人", "姓名", "联系人"), "phone": ("电话", "手机", "手机号", "联系电话", "Tel"),
          "address": ("地址", "收货地址", "详细地址", "收件地址")}
COLONS = ("：", ":", " ", "：")
SEPARATORS = ("，", ",", "；", ";", " ", "  ", "\n", " / ", " | ")
GREETINGS = ("", "", "", "您好，", "亲，", "老板，", "【收件信息】", "发货信息：", "麻烦发一下：")
REMARKS = ("", "", "", "，谢谢", "。谢谢！", "，尽快发货", "，周末也能收", "，放快递柜就行", "，到了打电话")
SENTENCES = (
    "麻烦寄到{address}，{name}收，电话{phone}",
    "帮我发到{address}，收件人{name}，手机{phone}，谢谢",
    "{name}（{phone}）{address}",
    "地址是{address}，联系人{name}，号码{phone}。",
    "寄给{name}，{phone}，{address}",
    "快递送到{address}，找{name}，电话{phone}",
    "{address}，{name}，{phone}，到了请打电话",
    "你好，我的收货信息：{name} {phone} {address}",
    "请发{address}，{name}收，联系方式{phone}，尽快发货",
    "收件人是{name}，电话是{phone}，地址在{address}",
    "{phone}，{name}，{address}，放快递柜就行",
    "亲，发{address}，{name}，手机{phone}",
    "{name}/{phone}/{address}",
    "老板你好，东西寄{address}，{name}，{phone}，周末也能收",
)


def write_phone(phone: str, rng: random.Random, tags: list[str]) -> str:
    a, b, c = phone[:3], phone[3:7], phone[7:]
    written = {"plain": (phone, 0.4), "spaces": (f"{a} {b} {c}", 0.15), "dashes": (f"{a}-{b}-{c}", 0.15),
               "+86_space": (f"+86 {phone}", 0.1), "+86": (f"+86{phone}", 0.05),
               "+86_dashes": (f"+86-{a}-{b}-{c}", 0.05), "(+86)_spaces": (f"(+86) {a} {b} {c}", 0.05),
               "86-": (f"86-{phone}", 0.05)}
    form = _weighted(rng, {name: weight for name, (_, weight) in written.items()})
    tags.append(f"phone:{form}")
    return written[form][0]


def write_region(fields: dict[str, str], rng: random.Random, tags: list[str]) -> list[str]:
    """Province and city as a sender writes them: full, short, abbreviated or left out (see the docstring)."""
    province = CITIES[fields["city"]]
    if province.municipality:
        form = _weighted(rng, {"full": 0.4, "short": 0.3, "abbr": 0.15, "twice": 0.15})
        tags += ["municipality", f"municipality:{form}"]
        return {"full": [province.name], "short": [province.short], "abbr": [province.abbr],
                "twice": [province.short, province.name]}[form]
    forms = {"full": 0.35, "short": 0.3, "abbr": 0.1, "none": 0.25}
    if province.abbr is None:
        del forms["abbr"]
    form = _weighted(rng, forms)
    city_form = _weighted(rng, {"full": 0.6, "short": 0.4})
    tags += [f"province:{form}", f"city:{city_form}"]
    city = fields["city"] if city_form == "full" else fields["city"].removesuffix("市")
    written = {"full": province.name, "short": province.short, "abbr": province.abbr, "none": None}[form]
    return [written, city] if written else [city]


def write_address(fields: dict[str, str], rng: random.Random, tags: list[str]) -> str:
    parts = [*write_region(fields, rng, tags), fields["district"], fields["street"], fields["detail"]]
    spaced = rng.random() < 0.3
    if spaced:
        tags.append("address:spaced")
    return (" " if spaced else "").join(parts)


def write_message(fields: dict[str, str], rng: random.Random) -> tuple[str, list[str]]:
    """(message, tags): one free-text message carrying the recipient, and how it was written."""
    tags: list[str] = []
    if (fields["city"], fields["district"]) in HELD_OUT_DISTRICTS:
        tags.append("new_district")
    values = {"name": fields["name"], "phone": write_phone(fields["phone"], rng, tags),
              "address": write_address(fields, rng, tags)}
    if rng.random() < 0.45:
        tags.append("sentence")
        return rng.choice(SENTENCES).format(**values), tags
    order = ["name", "phone", "address"]
    rng.shuffle(order)
    labelled = rng.random() < 0.5
    tags.append("fields:labelled" if labelled else "fields:bare")
    colon = rng.choice(COLONS)
    parts = [(rng.choice(LABELS[key]) + colon if labelled else "") + values[key] for key in order]
    return rng.choice(GREETINGS) + rng.choice(SEPARATORS).join(parts) + rng.choice(REMARKS), tags


# ------------------------------------------------------------------------------------------------- the files

def generate(train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, valid_size: int = VALID_SIZE,
             seed: int = SEED) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, valid). Training first, from the training streets and districts, every input distinct;
    then test and then valid from the same stream, each recipient's name, phone and detail new (in training and
    in every held-out record drawn before it) and its street one of the held-out ones."""
    rng = random.Random(seed)
    train_streets, held_out_streets = _street_split(seed)
    train: list[dict] = []
    inputs: set[str] = set()
    while len(train) < train_size:
        fields = sample_recipient(rng, train_streets, held_out=False)
        message, _ = write_message(fields, rng)
        if message not in inputs:
            inputs.add(message)
            train.append({"input": message, "output": answer(fields)})
    seen = {key: {json.loads(r["output"])[key] for r in train} for key in ("name", "phone", "detail")}

    def held_out(size: int) -> list[dict]:
        records: list[dict] = []
        while len(records) < size:
            fields = sample_recipient(rng, held_out_streets, held_out=True)
            if any(fields[key] in values for key, values in seen.items()):
                continue
            message, tags = write_message(fields, rng)
            for key, values in seen.items():
                values.add(fields[key])
            records.append({"input": message, "output": answer(fields), "tags": tags})
        return records

    test = held_out(test_size)
    valid = held_out(valid_size)
    return train, test, valid


# ------------------------------------------------------------------------------------------------- the score

def score(prediction: str, reference: str | dict[str, Any]) -> dict[str, float]:
    """Exact match of the whole object and per-field accuracy for one answer.

    `reference` is the expected answer (JSON text) or a record with "output". The prediction is parsed as JSON;
    text that is not one JSON object (invalid JSON, a list, trailing words) scores 0 on every field. Returned keys,
    the same for every answer: exact_match (1 when the object equals the reference: the seven fields right and no
    others; key order and spacing do not matter), field_accuracy (the share of the seven fields right), and
    "field:<name>" 1/0 for each field. A field is right when its value is the reference's string exactly.
    """
    if isinstance(reference, dict):
        reference = reference["output"]
    wanted = json.loads(reference)
    try:
        got = json.loads(prediction)
    except ValueError:
        got = None
    if not isinstance(got, dict):
        got = {}
    per_field = {f"field:{key}": float(key in got and got[key] == wanted[key]) for key in FIELDS}
    return {"exact_match": float(got == wanted), "field_accuracy": sum(per_field.values()) / len(FIELDS),
            **per_field}


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(out: Path = HERE) -> None:
    train, test, valid = generate()
    for name, records in (("train", train), ("test", test), ("valid", valid)):
        write_jsonl(out / f"{name}.jsonl", records)
    print(f"wrote {len(train)} training, {len(test)} test and {len(valid)} validation examples to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
