"""The follow-up utterances of the FLR reference code, per helpfulness aspect.

Data for ``score_flr``'s defaults (Zhang et al. 2024, "Aligning Language Models Using
Follow-up Likelihood as Reward Signal"): for each of six aspects of helpfulness, ten
positive and ten negative next user turns, exactly as listed in ``utils.py`` of the
authors' repository github.com/e0397123/FLR (``<aspect>_pos`` / ``<aspect>_neg``),
repeats and typographic apostrophes included, so that scores reproduce the reference.

The lists come under the FLR repository's licence, whose notice follows:

    MIT License

    Copyright (c) 2024 Chen Zhang

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""

from __future__ import annotations

ASPECTS = ("understanding", "relevance", "correctness", "engagingness", "informativeness", "following")


POSITIVE: dict[str, tuple[str, ...]] = {
    'understanding': (
        'You’re very clear and easy to understand.',
        'I completely understand what you’re saying.',
        'You are very clear.',
        'I understand perfectly now.',
        'I see exactly what you’re trying to say.',
        'That makes perfect sense!',
        'I understand completely!',
        'You’re making perfect sense.',
        'That makes perfect sense!',
        'Your explanation was clear and easy to follow.',
    ),
    'relevance': (
        'This is highly relevant here.',
        'This is highly pertinent to our discussion.',
        "You've answered my question perfectly.",
        'This information is exactly what I was looking for.',
        'That was exactly what I needed.',
        'That answers my question perfectly.',
        'Perfect, that fits right into what I was asking.',
        "That's directly related to my query.",
        "Yes, that's the kind of detail I was hoping for.",
        'Great response, very relevant.',
    ),
    'correctness': (
        'Your answer is truthful and correct.',
        'You gave me the correct details.',
        'You provided the correct answer.',
        'I appreciate the accurate information.',
        'You got it right.',
        "That's the right answer.",
        "I can confirm that's true.",
        "That's correct, great job!",
        'You gave me the correct details.',
        'Your information is spot on.',
    ),
    'engagingness': (
        'You’re very engaging.',
        'This is very interesting.',
        'That was a really engaging response.',
        'I definitely want to talk about that!',
        'I love how you explained that.',
        'I enjoyed reading your response.',
        'That was quite captivating!',
        'You definitely have my attention now.',
        'I really liked how you put that.',
        'You made that topic much more enjoyable.',
    ),
    'informativeness': (
        'That’s a very specific response.',
        'I learned a lot from your response.',
        'Your answer provided a lot of insight.',
        'That was full of useful information.',
        'Your response was very educational.',
        'You provided a lot of useful details.',
        'That explanation was very detailed and helpful.',
        'You really provided a lot of good information there.',
        'That was very enlightening.',
        'Thanks for the thorough explanation.',
    ),
    'following': (
        'Perfect, you followed my instructions exactly.',
        'Thanks for sticking to the guidelines I provided.',
        'You executed my request perfectly.',
        'That’s exactly what I asked for.',
        'Great job adhering to my instructions.',
        'You did exactly as I instructed.',
        'That’s exactly what I needed.',
        'That was perfect, just as I asked.',
        'You did a fantastic job following my instructions.',
        'That’s exactly what I had in mind.',
    ),
}

NEGATIVE: dict[str, tuple[str, ...]] = {
    'understanding': (
        "I don't think you understood my question.",
        "That's not what I was asking.",
        'I think you misunderstood what I meant.',
        "You didn't quite get what I was asking for.",
        'You’re really confusing.',
        'I am so confused right now.',
        'What are you trying to say?',
        'That makes no sense!',
        'You’re not understanding me!',
        "I don't think this is what I was asking about.",
    ),
    'relevance': (
        'That’s not really relevant here.',
        'I don’t understand what you’re saying.',
        'What does that even mean?',
        "Your response isn't relevant to my query.",
        "That's off-topic from what I asked.",
        "This isn't addressing my issue.",
        'Your response is not aligned with my request.',
        "This doesn't seem to relate to what I asked.",
        'I was asking about something else.',
        'This response is missing the point of my question.',
    ),
    'correctness': (
        'That’s not the right information.',
        'Your response is misleading.',
        "You didn't answer my question correctly.",
        "Your answer doesn't provide any useful information.",
        'Your information is wrong.',
        "You're providing incorrect details.",
        "That doesn't seem right.",
        'I think you got this wrong.',
        "You're providing false information.",
        'I found mistakes in your response.',
    ),
    'engagingness': (
        'You’re really boring.',
        'That’s not very interesting.',
        'That was a really boring response.',
        'I don’t want to talk about that!',
        'Your response feels a bit dry.',
        "That answer wasn't very engaging.",
        'Your reply feels a bit too mechanical.',
        'Your response is a bit too plain.',
        'I was hoping for something more interactive.',
        "This doesn't really hold my attention.",
    ),
    'informativeness': (
        'That’s a very generic response.',
        'Your explanation was vague and hard to follow.',
        "This response doesn't provide the information I need.",
        "This doesn't give me the information I was looking for.",
        'Your answer lacks the details I need.',
        'I was hoping for more detailed information.',
        "This doesn't give me the information I was looking for.",
        'Your answer is lacking in detail.',
        "That doesn't provide any new insights.",
        'I need a more informative answer.',
    ),
    'following': (
        "That's not what I asked you to do.",
        "You didn't follow my instructions.",
        "This isn't what I requested.",
        "This response doesn't match my request.",
        "You didn't adhere to my instructions.",
        "You didn't follow the guidelines I gave.",
        'I asked for something different.',
        "You didn't follow my request accurately.",
        "That's not how I wanted it done.",
        "You didn't stick to my instructions.",
    ),
}
