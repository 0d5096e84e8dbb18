"""Each function's environment as template.yaml gives it, for the local stack's invocations.

Deployed, Lambda gives a function exactly the variables SAM sets for it: the template's
``Globals.Function.Environment.Variables`` merged with the function's own
``Environment.Variables`` (the function's value wins on a name both set), each resolved by
CloudFormation, plus what the Lambda runtime sets itself (region, the role's credentials, ...).
A variable the template gives only the extractor is not there for the loader, and one the
template forgets is not there at all. So the local stack invokes each handler with that
environment, not with one environment for every function: a function that reads a variable the
template does not give it fails locally as it would deployed (``pgsnow.config`` reports it).

``template_environment`` reads a function's variables from the template (``pgsnow.local.aws``'s
loader and ``TemplateResolver``, the parameters of the local stack, as ``pgsnow.local.iam``
resolves the functions' policies). ``function_environment`` combines them with the local
stack's environment (``LocalStack.env``): a variable the template gives takes the stack's value
when the stack has one (it points the functions at the local servers; tests set options there),
else the template's resolved value. The only other variables are these, each for a stated reason:

* ``SECRET_STAND_INS``: the local stack creates no secrets; a function the template gives a
  secret's ARN gets, instead of the ARN, the local variables that carry what the secret would
  (``PGSNOW_PG_DSN`` for the PostgreSQL secret; the local Snowflake's account, user, password
  and address for the Snowflake secret). A function the template gives no secret gets none of
  them, so a forgotten secret fails locally too.
* ``LOCAL_PLUMBING``: what every function gets locally whatever the template says: the variables
  the Lambda runtime sets for every function (the region) and local-only switches.

What each handler then sees in ``os.environ`` is ``pgsnow.local.scoped_environ``'s doing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgsnow.config import Component
from pgsnow.errors import ConfigError
from pgsnow.local.aws import (
    NO_VALUE,
    REPO_TEMPLATE,
    StagingResources,
    TemplateResolver,
    Unresolvable,
    load_template,
)
from pgsnow.local.iam import FUNCTION_RESOURCES, template_resolver

# A secret's ARN variable the template gives -> the local variables that stand in for the secret.
SECRET_STAND_INS: Mapping[str, tuple[str, ...]] = {
    # The RDS-format secret holds host, port, user, password and database: locally one DSN.
    "PGSNOW_PG_SECRET_ARN": ("PGSNOW_PG_DSN",),
    # The Snowflake secret holds the account, user and key pair; the account also says where
    # Snowflake is. Locally: the fakesnow server's account, user and password, and its address
    # (and that of the local Snowpipe REST endpoint, which deployed is the account's host too).
    "SNOWFLAKE_SECRET_ARN": (
        "SNOWFLAKE_ACCOUNT",
        "SNOWFLAKE_USER",
        "SNOWFLAKE_PASSWORD",
        "SNOWFLAKE_HOST",
        "SNOWFLAKE_PORT",
        "SNOWFLAKE_PROTOCOL",
        "SNOWPIPE_HOST",
    ),
}

# Variables every function gets locally though the template sets none of them, and why. Nothing
# else reaches a function: in particular not the local administrator's AWS keys (each function
# has its own role's session, pgsnow.runtime.use_aws_session; deployed, Lambda puts the role's
# credentials in the environment), nor anything of the process that runs the stack.
LOCAL_PLUMBING: Mapping[str, str] = {
    "AWS_REGION": "the Lambda runtime sets it for every function",
    "AWS_DEFAULT_REGION": "the Lambda runtime sets it for every function",
    "AWS_ENDPOINT_URL": (
        "the moto server: a client not built from the function's role session still reaches the "
        "local server, which refuses it (it has no credentials moto knows), never real AWS"
    ),
    "POWERTOOLS_METRICS_DISABLED": (
        "EMF metric lines are for CloudWatch; locally they would only bury the report "
        "(pgsnow.observability.record_table_metric honours it)"
    ),
}


def template_environment(
    template: Mapping[str, Any], component: Component, resolver: TemplateResolver
) -> dict[str, str]:
    """The variables SAM gives ``component``'s function in ``template``, resolved by ``resolver``
    as CloudFormation would set them.

    Globals first, the function's own over them (SAM merges the two maps). A value that resolves
    to ``AWS::NoValue`` drops its variable; one that cannot be resolved locally is a ConfigError
    naming the function and the variable, never a guess."""
    logical_id = FUNCTION_RESOURCES[component]
    resource = (template.get("Resources") or {}).get(logical_id)
    if not isinstance(resource, Mapping):
        raise ConfigError([f"the template has no {logical_id}"])
    shared = ((template.get("Globals") or {}).get("Function") or {}).get("Environment") or {}
    own = (resource.get("Properties") or {}).get("Environment") or {}
    raw = {**_variables(shared, "Globals.Function"), **_variables(own, logical_id)}
    environment: dict[str, str] = {}
    problems: list[str] = []
    for name, value in raw.items():
        try:
            resolved = resolver.resolve(value)
        except (Unresolvable, KeyError, TypeError, ValueError, IndexError) as exc:
            problems.append(f"{logical_id}: cannot resolve its variable {name} locally ({exc})")
            continue
        if resolved is NO_VALUE:  # SAM leaves the variable out
            continue
        text = _as_text(resolved)
        if text is None:
            problems.append(f"{logical_id}: its variable {name} is not text ({resolved!r})")
            continue
        environment[name] = text
    if problems:
        raise ConfigError(problems)
    return environment


def template_environments(
    resources: StagingResources,
    parameters: Mapping[str, str],
    *,
    template_path: Path | None = None,
    region: str = "us-east-1",
) -> dict[Component, dict[str, str]]:
    """Every function's ``template_environment``, with the local stack's parameters and resources."""
    template = load_template(template_path or REPO_TEMPLATE)
    resolver = template_resolver(template, parameters, resources=resources, region=region)
    return {
        component: template_environment(template, component, resolver) for component in FUNCTION_RESOURCES
    }


def function_environment(template_env: Mapping[str, str], stack_env: Mapping[str, str]) -> dict[str, str]:
    """What one function sees locally: the variables of ``template_env`` (its template
    environment), with the local stack's value where ``stack_env`` has one, secrets replaced by
    their ``SECRET_STAND_INS``, and ``LOCAL_PLUMBING``. Nothing else of ``stack_env``."""
    environment: dict[str, str] = {}
    for name, value in template_env.items():
        stand_ins = SECRET_STAND_INS.get(name)
        if stand_ins is None:
            environment[name] = stack_env.get(name, value)
            continue
        # The template's value names a secret the local stack did not create; a stack (a test)
        # that created one and set its ARN gives it, as deployed.
        if stack_env.get(name):
            environment[name] = stack_env[name]
        environment.update({n: stack_env[n] for n in stand_ins if n in stack_env})
    environment.update({name: stack_env[name] for name in LOCAL_PLUMBING if name in stack_env})
    return environment


def _variables(environment: Any, where: str) -> dict[str, Any]:
    if not isinstance(environment, Mapping) or set(environment) - {"Variables"}:
        raise ConfigError([f"{where}: Environment must be a map with Variables only, got {environment!r}"])
    variables = environment.get("Variables") or {}
    if not isinstance(variables, Mapping):
        raise ConfigError([f"{where}: Environment.Variables must be a map locally, got {variables!r}"])
    return {str(name): value for name, value in variables.items()}


def _as_text(value: Any) -> str | None:
    """A resolved value as Lambda stores it (environment values are strings); None for a list or
    a map, which CloudFormation refuses as a variable's value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None
