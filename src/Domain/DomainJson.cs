using System.Text.Json;
using System.Text.Json.Serialization;

namespace FineTune.Domain;

/// <summary>The one JSON shape of our types, in jsonb columns and on the wire: camelCase, enums as lowercase strings.</summary>
public static class DomainJson
{
    public static readonly JsonSerializerOptions Options = Create();

    /// <summary>Strict options for reading client input: unknown fields, missing required values and nulls for
    /// non-nullable members are errors (each a <see cref="JsonException"/> naming the JSON path).</summary>
    public static readonly JsonSerializerOptions Strict = Create(strict: true);

    public static JsonSerializerOptions Create(bool strict = false)
    {
        var o = new JsonSerializerOptions(JsonSerializerDefaults.Web)
        {
            DefaultIgnoreCondition = JsonIgnoreCondition.Never,
            AllowOutOfOrderMetadataProperties = true,
            Converters = { new JsonStringEnumConverter(JsonNamingPolicy.SnakeCaseLower, allowIntegerValues: false) },
        };
        if (strict)
        {
            o.UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow;
            o.RespectRequiredConstructorParameters = true;
            o.RespectNullableAnnotations = true;
            o.NumberHandling = JsonNumberHandling.Strict;
        }
        o.MakeReadOnly(populateMissingResolver: true);
        return o;
    }
}
