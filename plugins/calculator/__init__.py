"""The calculator: a tool the model calls for arithmetic it would get wrong (the book's §3.4).

In a Sol model's answer:  <|tool_call|>calculator: 12*7<|tool_end|>
and the chat loop forces: <|tool_result|>84<|tool_end|>
"""
from __future__ import annotations

from sol.core.data.arithmetic import CalculatorError, evaluate, format_result
from sol.core.plugins.hooks import ToolSpec, hookimpl

NAME = "calculator"
DESCRIPTION = ("Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses, "
               "sqrt, log, exp, sin, cos, tan, abs, round, floor, ceil, pi, e.")
PARAMETERS = {
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "for example: 12*7 or sqrt(2)/3"}},
    "required": ["expression"],
}


def calculate(arguments: dict) -> str:
    """The tool: {"expression": "12*7"} -> "84" (text, so big integers stay exact in JSON)."""
    expression = arguments.get("expression")
    if isinstance(expression, (int, float)) and not isinstance(expression, bool):
        expression = str(expression)
    return format_result(evaluate(expression))


@hookimpl
def sol_tools():
    return [ToolSpec(name="calculator", description=DESCRIPTION, parameters=PARAMETERS, func=calculate)]


__all__ = ["NAME", "CalculatorError", "evaluate", "format_result", "calculate", "sol_tools"]
