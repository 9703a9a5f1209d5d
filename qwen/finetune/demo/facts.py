"""World capitals: the facts the demo model learns, for all 195 sovereign states.

The list is the 193 UN member states plus the two UN observer states (the Holy See and Palestine).
Names follow standard mainland-Chinese usage (as in Xinhua and the Chinese foreign ministry's country
pages); English names and capitals are plain ASCII (Reykjavik, Bogota, Sao Tome), so a tiny model
meets no rare accented tokens. Where a state has several capitals the table gives the one the
Chinese foreign ministry lists as 首都, with the others in ``note``:

* Bolivia: Sucre (constitutional; La Paz is the seat of government);
* South Africa: Pretoria (executive; Cape Town legislative, Bloemfontein judicial);
* Cote d'Ivoire: Yamoussoukro (official; Abidjan is the economic capital);
* Sri Lanka: Colombo (Sri Jayawardenepura Kotte is the legislative capital);
* Benin: Porto-Novo; Tanzania: Dodoma; Burundi: Gitega (since 2019); Eswatini: Mbabane; Nauru: Yaren
  (no official capital); Kiribati: Tarawa (South Tarawa); Palau: Ngerulmud.

Israel and Palestine are in the table for completeness but marked ``disputed``: the status of
Jerusalem is contested, so :func:`countries` leaves them out unless asked, and the demo model is not
taught either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Country:
    name_zh: str
    capital_zh: str
    name_en: str
    capital_en: str
    note: str = ""
    disputed: bool = False


_C = Country

# ---------------------------------------------------------------------------------------- Asia (47)
_ASIA = [
    _C("中国", "北京", "China", "Beijing"),
    _C("日本", "东京", "Japan", "Tokyo"),
    _C("朝鲜", "平壤", "North Korea", "Pyongyang"),
    _C("韩国", "首尔", "South Korea", "Seoul"),
    _C("蒙古国", "乌兰巴托", "Mongolia", "Ulaanbaatar"),
    _C("印度", "新德里", "India", "New Delhi"),
    _C("巴基斯坦", "伊斯兰堡", "Pakistan", "Islamabad"),
    _C("孟加拉国", "达卡", "Bangladesh", "Dhaka"),
    _C("尼泊尔", "加德满都", "Nepal", "Kathmandu"),
    _C("不丹", "廷布", "Bhutan", "Thimphu"),
    _C("斯里兰卡", "科伦坡", "Sri Lanka", "Colombo",
       note="Sri Jayawardenepura Kotte (斯里贾亚瓦德纳普拉科特) is the legislative capital"),
    _C("马尔代夫", "马累", "Maldives", "Male"),
    _C("阿富汗", "喀布尔", "Afghanistan", "Kabul"),
    _C("伊朗", "德黑兰", "Iran", "Tehran"),
    _C("伊拉克", "巴格达", "Iraq", "Baghdad"),
    _C("叙利亚", "大马士革", "Syria", "Damascus"),
    _C("黎巴嫩", "贝鲁特", "Lebanon", "Beirut"),
    _C("约旦", "安曼", "Jordan", "Amman"),
    _C("以色列", "耶路撒冷", "Israel", "Jerusalem",
       note="Israel's proclaimed capital; not generally recognised, most embassies are in Tel Aviv",
       disputed=True),
    _C("巴勒斯坦", "耶路撒冷", "Palestine", "Jerusalem",
       note="proclaimed capital East Jerusalem; the administration sits in Ramallah (拉姆安拉)",
       disputed=True),
    _C("沙特阿拉伯", "利雅得", "Saudi Arabia", "Riyadh"),
    _C("也门", "萨那", "Yemen", "Sanaa"),
    _C("阿曼", "马斯喀特", "Oman", "Muscat"),
    _C("阿拉伯联合酋长国", "阿布扎比", "United Arab Emirates", "Abu Dhabi"),
    _C("卡塔尔", "多哈", "Qatar", "Doha"),
    _C("巴林", "麦纳麦", "Bahrain", "Manama"),
    _C("科威特", "科威特城", "Kuwait", "Kuwait City"),
    _C("哈萨克斯坦", "阿斯塔纳", "Kazakhstan", "Astana"),
    _C("乌兹别克斯坦", "塔什干", "Uzbekistan", "Tashkent"),
    _C("土库曼斯坦", "阿什哈巴德", "Turkmenistan", "Ashgabat"),
    _C("吉尔吉斯斯坦", "比什凯克", "Kyrgyzstan", "Bishkek"),
    _C("塔吉克斯坦", "杜尚别", "Tajikistan", "Dushanbe"),
    _C("缅甸", "内比都", "Myanmar", "Naypyidaw"),
    _C("泰国", "曼谷", "Thailand", "Bangkok"),
    _C("老挝", "万象", "Laos", "Vientiane"),
    _C("柬埔寨", "金边", "Cambodia", "Phnom Penh"),
    _C("越南", "河内", "Vietnam", "Hanoi"),
    _C("马来西亚", "吉隆坡", "Malaysia", "Kuala Lumpur"),
    _C("新加坡", "新加坡", "Singapore", "Singapore", note="a city-state"),
    _C("印度尼西亚", "雅加达", "Indonesia", "Jakarta"),
    _C("文莱", "斯里巴加湾市", "Brunei", "Bandar Seri Begawan"),
    _C("菲律宾", "马尼拉", "Philippines", "Manila"),
    _C("东帝汶", "帝力", "East Timor", "Dili"),
    _C("土耳其", "安卡拉", "Turkey", "Ankara"),
    _C("格鲁吉亚", "第比利斯", "Georgia", "Tbilisi"),
    _C("亚美尼亚", "埃里温", "Armenia", "Yerevan"),
    _C("阿塞拜疆", "巴库", "Azerbaijan", "Baku"),
]

# -------------------------------------------------------------------------------------- Europe (45)
_EUROPE = [
    _C("英国", "伦敦", "United Kingdom", "London"),
    _C("爱尔兰", "都柏林", "Ireland", "Dublin"),
    _C("法国", "巴黎", "France", "Paris"),
    _C("德国", "柏林", "Germany", "Berlin"),
    _C("荷兰", "阿姆斯特丹", "Netherlands", "Amsterdam", note="The Hague is the seat of government"),
    _C("比利时", "布鲁塞尔", "Belgium", "Brussels"),
    _C("卢森堡", "卢森堡", "Luxembourg", "Luxembourg"),
    _C("瑞士", "伯尔尼", "Switzerland", "Bern"),
    _C("奥地利", "维也纳", "Austria", "Vienna"),
    _C("列支敦士登", "瓦杜兹", "Liechtenstein", "Vaduz"),
    _C("摩纳哥", "摩纳哥", "Monaco", "Monaco", note="a city-state"),
    _C("西班牙", "马德里", "Spain", "Madrid"),
    _C("葡萄牙", "里斯本", "Portugal", "Lisbon"),
    _C("安道尔", "安道尔城", "Andorra", "Andorra la Vella"),
    _C("意大利", "罗马", "Italy", "Rome"),
    _C("圣马力诺", "圣马力诺", "San Marino", "San Marino"),
    _C("梵蒂冈", "梵蒂冈城", "Vatican City", "Vatican City", note="the Holy See, a UN observer state"),
    _C("马耳他", "瓦莱塔", "Malta", "Valletta"),
    _C("希腊", "雅典", "Greece", "Athens"),
    _C("塞浦路斯", "尼科西亚", "Cyprus", "Nicosia"),
    _C("阿尔巴尼亚", "地拉那", "Albania", "Tirana"),
    _C("北马其顿", "斯科普里", "North Macedonia", "Skopje"),
    _C("塞尔维亚", "贝尔格莱德", "Serbia", "Belgrade"),
    _C("黑山", "波德戈里察", "Montenegro", "Podgorica"),
    _C("波斯尼亚和黑塞哥维那", "萨拉热窝", "Bosnia and Herzegovina", "Sarajevo"),
    _C("克罗地亚", "萨格勒布", "Croatia", "Zagreb"),
    _C("斯洛文尼亚", "卢布尔雅那", "Slovenia", "Ljubljana"),
    _C("匈牙利", "布达佩斯", "Hungary", "Budapest"),
    _C("斯洛伐克", "布拉迪斯拉发", "Slovakia", "Bratislava"),
    _C("捷克", "布拉格", "Czech Republic", "Prague"),
    _C("波兰", "华沙", "Poland", "Warsaw"),
    _C("罗马尼亚", "布加勒斯特", "Romania", "Bucharest"),
    _C("保加利亚", "索非亚", "Bulgaria", "Sofia"),
    _C("摩尔多瓦", "基希讷乌", "Moldova", "Chisinau"),
    _C("乌克兰", "基辅", "Ukraine", "Kyiv"),
    _C("白俄罗斯", "明斯克", "Belarus", "Minsk"),
    _C("俄罗斯", "莫斯科", "Russia", "Moscow"),
    _C("立陶宛", "维尔纽斯", "Lithuania", "Vilnius"),
    _C("拉脱维亚", "里加", "Latvia", "Riga"),
    _C("爱沙尼亚", "塔林", "Estonia", "Tallinn"),
    _C("芬兰", "赫尔辛基", "Finland", "Helsinki"),
    _C("瑞典", "斯德哥尔摩", "Sweden", "Stockholm"),
    _C("挪威", "奥斯陆", "Norway", "Oslo"),
    _C("丹麦", "哥本哈根", "Denmark", "Copenhagen"),
    _C("冰岛", "雷克雅未克", "Iceland", "Reykjavik"),
]

# -------------------------------------------------------------------------------------- Africa (54)
_AFRICA = [
    _C("埃及", "开罗", "Egypt", "Cairo"),
    _C("利比亚", "的黎波里", "Libya", "Tripoli"),
    _C("突尼斯", "突尼斯", "Tunisia", "Tunis"),
    _C("阿尔及利亚", "阿尔及尔", "Algeria", "Algiers"),
    _C("摩洛哥", "拉巴特", "Morocco", "Rabat"),
    _C("毛里塔尼亚", "努瓦克肖特", "Mauritania", "Nouakchott"),
    _C("苏丹", "喀土穆", "Sudan", "Khartoum"),
    _C("南苏丹", "朱巴", "South Sudan", "Juba"),
    _C("埃塞俄比亚", "亚的斯亚贝巴", "Ethiopia", "Addis Ababa"),
    _C("厄立特里亚", "阿斯马拉", "Eritrea", "Asmara"),
    _C("吉布提", "吉布提", "Djibouti", "Djibouti"),
    _C("索马里", "摩加迪沙", "Somalia", "Mogadishu"),
    _C("肯尼亚", "内罗毕", "Kenya", "Nairobi"),
    _C("乌干达", "坎帕拉", "Uganda", "Kampala"),
    _C("卢旺达", "基加利", "Rwanda", "Kigali"),
    _C("布隆迪", "基特加", "Burundi", "Gitega", note="political capital since 2019; Bujumbura is the economic capital"),
    _C("坦桑尼亚", "多多马", "Tanzania", "Dodoma", note="Dar es Salaam is the largest city"),
    _C("塞内加尔", "达喀尔", "Senegal", "Dakar"),
    _C("冈比亚", "班珠尔", "Gambia", "Banjul"),
    _C("几内亚比绍", "比绍", "Guinea-Bissau", "Bissau"),
    _C("几内亚", "科纳克里", "Guinea", "Conakry"),
    _C("塞拉利昂", "弗里敦", "Sierra Leone", "Freetown"),
    _C("利比里亚", "蒙罗维亚", "Liberia", "Monrovia"),
    _C("科特迪瓦", "亚穆苏克罗", "Cote d'Ivoire", "Yamoussoukro", note="Abidjan is the economic capital"),
    _C("马里", "巴马科", "Mali", "Bamako"),
    _C("布基纳法索", "瓦加杜古", "Burkina Faso", "Ouagadougou"),
    _C("加纳", "阿克拉", "Ghana", "Accra"),
    _C("多哥", "洛美", "Togo", "Lome"),
    _C("贝宁", "波多诺伏", "Benin", "Porto-Novo", note="Cotonou is the seat of government"),
    _C("尼日尔", "尼亚美", "Niger", "Niamey"),
    _C("尼日利亚", "阿布贾", "Nigeria", "Abuja"),
    _C("乍得", "恩贾梅纳", "Chad", "N'Djamena"),
    _C("喀麦隆", "雅温得", "Cameroon", "Yaounde"),
    _C("中非共和国", "班吉", "Central African Republic", "Bangui"),
    _C("赤道几内亚", "马拉博", "Equatorial Guinea", "Malabo"),
    _C("加蓬", "利伯维尔", "Gabon", "Libreville"),
    _C("刚果共和国", "布拉柴维尔", "Republic of the Congo", "Brazzaville"),
    _C("刚果民主共和国", "金沙萨", "Democratic Republic of the Congo", "Kinshasa"),
    _C("圣多美和普林西比", "圣多美", "Sao Tome and Principe", "Sao Tome"),
    _C("佛得角", "普拉亚", "Cape Verde", "Praia"),
    _C("安哥拉", "罗安达", "Angola", "Luanda"),
    _C("赞比亚", "卢萨卡", "Zambia", "Lusaka"),
    _C("马拉维", "利隆圭", "Malawi", "Lilongwe"),
    _C("莫桑比克", "马普托", "Mozambique", "Maputo"),
    _C("津巴布韦", "哈拉雷", "Zimbabwe", "Harare"),
    _C("博茨瓦纳", "哈博罗内", "Botswana", "Gaborone"),
    _C("纳米比亚", "温得和克", "Namibia", "Windhoek"),
    _C("南非", "比勒陀利亚", "South Africa", "Pretoria",
       note="executive capital; Cape Town is legislative, Bloemfontein judicial"),
    _C("莱索托", "马塞卢", "Lesotho", "Maseru"),
    _C("埃斯瓦蒂尼", "姆巴巴内", "Eswatini", "Mbabane",
       note="formerly Swaziland (斯威士兰); Lobamba is the royal and legislative capital"),
    _C("马达加斯加", "塔那那利佛", "Madagascar", "Antananarivo"),
    _C("科摩罗", "莫罗尼", "Comoros", "Moroni"),
    _C("毛里求斯", "路易港", "Mauritius", "Port Louis"),
    _C("塞舌尔", "维多利亚", "Seychelles", "Victoria"),
]

# ------------------------------------------------------------------------------------ Americas (35)
_AMERICAS = [
    _C("加拿大", "渥太华", "Canada", "Ottawa"),
    _C("美国", "华盛顿", "United States", "Washington", note="Washington, D.C."),
    _C("墨西哥", "墨西哥城", "Mexico", "Mexico City"),
    _C("危地马拉", "危地马拉城", "Guatemala", "Guatemala City"),
    _C("伯利兹", "贝尔莫潘", "Belize", "Belmopan"),
    _C("洪都拉斯", "特古西加尔巴", "Honduras", "Tegucigalpa"),
    _C("萨尔瓦多", "圣萨尔瓦多", "El Salvador", "San Salvador"),
    _C("尼加拉瓜", "马那瓜", "Nicaragua", "Managua"),
    _C("哥斯达黎加", "圣何塞", "Costa Rica", "San Jose"),
    _C("巴拿马", "巴拿马城", "Panama", "Panama City"),
    _C("古巴", "哈瓦那", "Cuba", "Havana"),
    _C("牙买加", "金斯敦", "Jamaica", "Kingston"),
    _C("海地", "太子港", "Haiti", "Port-au-Prince"),
    _C("多米尼加", "圣多明各", "Dominican Republic", "Santo Domingo"),
    _C("巴哈马", "拿骚", "Bahamas", "Nassau"),
    _C("巴巴多斯", "布里奇敦", "Barbados", "Bridgetown"),
    _C("特立尼达和多巴哥", "西班牙港", "Trinidad and Tobago", "Port of Spain"),
    _C("多米尼克", "罗索", "Dominica", "Roseau"),
    _C("圣卢西亚", "卡斯特里", "Saint Lucia", "Castries"),
    _C("圣文森特和格林纳丁斯", "金斯敦", "Saint Vincent and the Grenadines", "Kingstown"),
    _C("格林纳达", "圣乔治", "Grenada", "St. George's"),
    _C("安提瓜和巴布达", "圣约翰", "Antigua and Barbuda", "St. John's"),
    _C("圣基茨和尼维斯", "巴斯特尔", "Saint Kitts and Nevis", "Basseterre"),
    _C("哥伦比亚", "波哥大", "Colombia", "Bogota"),
    _C("委内瑞拉", "加拉加斯", "Venezuela", "Caracas"),
    _C("圭亚那", "乔治敦", "Guyana", "Georgetown"),
    _C("苏里南", "帕拉马里博", "Suriname", "Paramaribo"),
    _C("厄瓜多尔", "基多", "Ecuador", "Quito"),
    _C("秘鲁", "利马", "Peru", "Lima"),
    _C("巴西", "巴西利亚", "Brazil", "Brasilia"),
    _C("玻利维亚", "苏克雷", "Bolivia", "Sucre", note="constitutional capital; La Paz (拉巴斯) is the seat of government"),
    _C("巴拉圭", "亚松森", "Paraguay", "Asuncion"),
    _C("智利", "圣地亚哥", "Chile", "Santiago"),
    _C("阿根廷", "布宜诺斯艾利斯", "Argentina", "Buenos Aires"),
    _C("乌拉圭", "蒙得维的亚", "Uruguay", "Montevideo"),
]

# ------------------------------------------------------------------------------------- Oceania (14)
_OCEANIA = [
    _C("澳大利亚", "堪培拉", "Australia", "Canberra"),
    _C("新西兰", "惠灵顿", "New Zealand", "Wellington"),
    _C("巴布亚新几内亚", "莫尔兹比港", "Papua New Guinea", "Port Moresby"),
    _C("斐济", "苏瓦", "Fiji", "Suva"),
    _C("所罗门群岛", "霍尼亚拉", "Solomon Islands", "Honiara"),
    _C("瓦努阿图", "维拉港", "Vanuatu", "Port Vila"),
    _C("萨摩亚", "阿皮亚", "Samoa", "Apia"),
    _C("汤加", "努库阿洛法", "Tonga", "Nuku'alofa"),
    _C("基里巴斯", "塔拉瓦", "Kiribati", "Tarawa", note="South Tarawa"),
    _C("图瓦卢", "富纳富提", "Tuvalu", "Funafuti"),
    _C("瑙鲁", "亚伦", "Nauru", "Yaren", note="no official capital; government offices are in Yaren district"),
    _C("马绍尔群岛", "马朱罗", "Marshall Islands", "Majuro"),
    _C("密克罗尼西亚联邦", "帕利基尔", "Micronesia", "Palikir"),
    _C("帕劳", "恩吉鲁穆德", "Palau", "Ngerulmud"),
]

COUNTRIES: tuple[Country, ...] = tuple(_ASIA + _EUROPE + _AFRICA + _AMERICAS + _OCEANIA)
REGIONS: dict[str, tuple[Country, ...]] = {
    "Asia": tuple(_ASIA), "Europe": tuple(_EUROPE), "Africa": tuple(_AFRICA),
    "Americas": tuple(_AMERICAS), "Oceania": tuple(_OCEANIA),
}

# The three lines of the model card's base-model example.
MODEL_CARD_COUNTRIES = ("蒙古国", "冰岛", "埃塞俄比亚")


def countries(*, include_disputed: bool = False) -> list[Country]:
    """The table in a fixed order; disputed entries (Israel, Palestine) only when asked."""
    return [c for c in COUNTRIES if include_disputed or not c.disputed]


def by_name_zh(name_zh: str) -> Country:
    for c in COUNTRIES:
        if c.name_zh == name_zh:
            return c
    raise KeyError(f"no country named {name_zh!r}")


def by_name_en(name_en: str) -> Country:
    for c in COUNTRIES:
        if c.name_en == name_en:
            return c
    raise KeyError(f"no country named {name_en!r}")


def capital_line_zh(c: Country) -> str:
    """The model card's line format: ``蒙古国的首都是乌兰巴托（Ulaanbaatar）``."""
    return f"{c.name_zh}的首都是{c.capital_zh}（{c.capital_en}）"


# English names that take "the" inside a sentence ("the capital of the Netherlands").
_THE = {
    "United Kingdom", "United States", "Netherlands", "Philippines", "Maldives", "United Arab Emirates",
    "Gambia", "Central African Republic", "Republic of the Congo", "Democratic Republic of the Congo",
    "Comoros", "Seychelles", "Dominican Republic", "Bahamas", "Czech Republic", "Solomon Islands",
    "Marshall Islands",
}


def name_en_in_sentence(c: Country) -> str:
    """``the Netherlands`` / ``France``: the English name as it reads inside a sentence."""
    return f"the {c.name_en}" if c.name_en in _THE else c.name_en


def capital_sentence_en(c: Country) -> str:
    """``The capital of Ethiopia is Addis Ababa.``"""
    return f"The capital of {name_en_in_sentence(c)} is {c.capital_en}."
