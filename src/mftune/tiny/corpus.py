"""Fixed English and code text that, with the example data, trains the tiny tokenizer.

Changing this text changes the shipped tokenizer: rebuild it with `scripts/build_tokenizer.py`.
"""

CORPUS = '''\
system user assistant human bot gpt instruction input output response answer question
You are a helpful assistant. Answer the question, then stop. Hello, world!
The quick brown fox jumps over the lazy dog. A model learns many tasks at once.
Write a function that returns the sum of a list. Explain what this code does.
Translate the following Python function to JavaScript. Complete the code below.
Generate a unit test for this method. Fix the bug in the snippet and describe the change.

Fine-tuning adapts a pretrained language model to new tasks with a small amount of data.
When several tasks are trained together, the largest one can dominate the gradient, and a
small task may be forgotten or overfitted while another is still improving. Balancing the
loss between tasks keeps every task learning at a similar pace. Each example is a
conversation: a system message sets the behaviour, the user asks, and the assistant replies.
Only the assistant's words are trained; the prompt is context. Sequences are packed into rows
of fixed length so that no compute is wasted on padding, and attention never crosses from one
sample into the next. Validation loss is measured per task after every few hundred steps, and
checkpoints are saved so that an interrupted run can resume exactly where it stopped.

Programs read input, compute a result and print it. A variable stores a value; a function
groups statements under a name; a class bundles data with the methods that change it. Lists,
tuples, dictionaries and sets are the common containers. Errors are raised as exceptions and
handled with try and except. Tests check that code behaves as expected: each test calls a
function with known arguments and compares the result with the right answer. Good names,
short functions and clear comments make software easier to read, review and maintain.
Numbers: zero one two three four five six seven eight nine ten hundred thousand million.
Days: Monday Tuesday Wednesday Thursday Friday Saturday Sunday. Months: January February
March April May June July August September October November December.
Colours: red green blue yellow orange purple black white grey. Shapes: circle square triangle.
Words: above across after again against almost along already also always among another
because before behind below between both build called change could different during early
enough every example family follow found great group important interest large later learn
little might mother never number often other paper people place point possible problem
public quickly really right school second should small something sometimes special start
state still story study system their there these thing think those though thought through
together under until using usually water where which while without world would write young.
More: able accept account across action activity actually address admit adult affect afraid
agency agent agree ahead allow alone already although amount analysis animal another answer
anyone anything appear apply approach area argue around arrive article artist attack attention
author available avoid away baby back ball bank base beautiful become begin behaviour believe
benefit best better beyond billion board body book born both break bring brother budget
business buy camera campaign cancer candidate capital card care career carry case catch cause
cell center central century certain chair challenge chance character charge check child choice
choose church citizen city civil claim class clear close coach cold collection college colour
come commercial common community company compare computer concern condition conference
consider consumer contain continue control cost country couple course court cover create crime
cultural culture current customer dark data daughter dead deal death debate decade decide
decision deep defense degree democratic describe design despite detail determine develop
device difference difficult dinner direction director discover discuss disease doctor door
down draw dream drive drop drug each economic economy edge education effect effort eight
either election else employee energy enjoy entire environment especially establish even
evening event ever everybody evidence exactly executive exist expect experience expert explain
face fact factor fail fall family far fast father fear federal feel field fight figure fill
film final finally financial find fine finger finish fire firm first fish five floor focus
foot force foreign forget form former forward free friend front full fund future game garden
gas general generation girl give glass goal good government ground grow growth guess gun guy
hair half hand hang happen happy hard have head health hear heart heat heavy help herself high
himself history hold home hope hospital hot hotel hour house however huge human hundred
husband idea identify image imagine impact improve include including increase indeed indicate
individual industry information inside instead institution interest international interview
into investment involve issue item itself job join just keep kill kind kitchen know knowledge
land language last late laugh lawyer lead leader leave left legal less letter level life light
like likely line list listen live local long look lose loss love machine magazine main maintain
major majority make manage management manager many market marriage material matter maybe mean
measure media medical meet meeting member memory mention method middle military mind minute
miss mission model modern moment money month morning most mouth move movie much music must
myself name nation natural nature near nearly necessary need network news newspaper next nice
night none north note nothing notice now number occur offer office officer official often oil
hello hello_world hello() print("hello") return True return False return None self.name self.value

import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional


def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(number: int) -> bool:
    if number < 2:
        return False
    for divisor in range(2, int(math.sqrt(number)) + 1):
        if number % divisor == 0:
            return False
    return True


def word_count(text: str) -> dict[str, int]:
    counts = Counter(word.lower() for word in re.findall(r"[a-zA-Z]+", text))
    return dict(counts.most_common(10))


def flatten(nested: Iterable[list[Any]]) -> list[Any]:
    return [item for sublist in nested for item in sublist]


def binary_search(values: list[int], target: int) -> int:
    low, high = 0, len(values) - 1
    while low <= high:
        middle = (low + high) // 2
        if values[middle] == target:
            return middle
        elif values[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


@dataclass
class Config:
    name: str
    learning_rate: float = 1e-4
    batch_size: int = 32
    tags: list[str] = field(default_factory=list)


class Stack:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def push(self, item: Any) -> None:
        self.items.append(item)

    def pop(self) -> Any:
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def __len__(self) -> int:
        return len(self.items)


def load_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: {error}") from error
    return records


def test_fibonacci():
    assert fibonacci(0) == 0
    assert fibonacci(10) == 55
    assert is_prime(7) and not is_prime(9)
    assert binary_search([1, 3, 5, 7], 5) == 2


if __name__ == "__main__":
    print([x * x for x in range(10) if x % 2 == 0], {"key": "value"}, None, True, False)
    groups = defaultdict(list)
    for index, value in enumerate(sys.argv[1:]):
        groups[len(value)].append((index, value))
    total = sum(abs(x) for x in [-1, 2, -3]) / max(1, os.cpu_count() or 1)
    result: Optional[str] = None
    print(f"total={total:.2f} result={result!r}", file=sys.stderr)

function add(a, b) { return a + b; }
const doubled = [1, 2, 3].map((x) => x * 2).filter((x) => x > 2);
let message = `count: ${doubled.length}`;
console.log(message);
async function fetchJson(url) { const response = await fetch(url); return response.json(); }

public class Main {
    public static void main(String[] args) {
        System.out.println("Hello, world!");
    }
}

#include <stdio.h>
int main(void) { for (int i = 0; i < 10; i++) { printf("%d\\n", i); } return 0; }

func Sum(values []int) int { total := 0; for _, v := range values { total += v }; return total }
fn main() { let v: Vec<i32> = vec![1, 2, 3]; println!("{:?}", v.iter().sum::<i32>()); }
SELECT name, COUNT(*) AS total FROM users WHERE active = 1 GROUP BY name ORDER BY total DESC;
'''
